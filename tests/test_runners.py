"""Three `scripts/pipeline.py` of ONE campaign started at once against ONE storage must end with
the studies one runner leaves: every search phase exactly its n_trials COMPLETE trials, one
derived range for the narrowed phase, one COMPLETE trial per (candidate, seed) of the confirm
race, one per seed in the final study, nothing WAITING or RUNNING, and the same verdict and final
results in every runner's --json. Also when one runner is SIGKILLed mid-phase.

Real processes on the tiny CIFAR-10 (conftest), each `--workers 1 --json`; the storage is read
back with Optuna itself (tests/runnerlib.py, whose check_* helpers name every broken guarantee
at once). Run alone: `python -m pytest tests/test_runners.py` (PostgreSQL: set $CLR_PG_URL, as
.ci/run does).

On SQLite the runners share one --out-dir (the same command run three times on one machine); on
PostgreSQL each has its own (the same campaign run from three machines).
"""
import signal
import uuid

import pytest

import faultlib as fl
import runnerlib as rl

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RUNNERS = 3
WAIT = 300  # seconds for all runners; one runner alone takes ~20 s here
# pipeline.py has no --heartbeat-interval/--grace-period flags: a killed runner's trial is failed
# and retried after the default grace period (search.study.GRACE_PERIOD, 20 s), or three of them
# when it died before its first heartbeat.
KILL_WAIT = 420


def three_runners(url, campaign, data_dir, tmp_path, shared_out):
    def args_of(i):
        out = tmp_path / ("out" if shared_out else f"out{i}")
        return rl.pipeline_args(url, campaign, data_dir, out)
    return rl.start_runners(RUNNERS, args_of, rl.env_for(tmp_path), tmp_path / "logs")


@pytest.mark.timeout(WAIT + 60)
def test_one_runner_passes_every_check(cifar_tiny_dir, tmp_path):
    # the control: the checks hold for the campaign one runner leaves (so that a failure with
    # three runners is theirs, not the checks')
    url = fl.sqlite_url(tmp_path / "s.db")
    runner = rl.start_pipeline(rl.pipeline_args(url, "one", cifar_tiny_dir.batches,
                                                tmp_path / "out"),
                               rl.env_for(tmp_path), tmp_path / "logs", "runner0")
    try:
        runs = rl.wait_all([runner], WAIT)
    finally:
        rl.kill_all([runner])
    rl.assert_no_problems(rl.campaign_problems(url, "one", runs, 1), runs)


@pytest.mark.timeout(WAIT + 60)
def test_three_runners_on_sqlite_leave_the_studies_of_one(cifar_tiny_dir, tmp_path):
    url = fl.sqlite_url(tmp_path / "s.db")
    runners = three_runners(url, "three", cifar_tiny_dir.batches, tmp_path, shared_out=True)
    try:
        runs = rl.wait_all(runners, WAIT)
    finally:
        rl.kill_all(runners)
    rl.assert_no_problems(rl.campaign_problems(url, "three", runs, RUNNERS), runs)


@pytest.mark.timeout(WAIT + 60)
@pytest.mark.postgres
def test_three_runners_on_postgres_leave_the_studies_of_one(cifar_tiny_dir, tmp_path):
    url = fl.pg_url_or_skip()
    campaign = f"three-{uuid.uuid4().hex[:10]}"  # unique: the database outlives the test
    fl.init_schema(url)  # the fresh-schema creation race is test_search.py's business
    runners = three_runners(url, campaign, cifar_tiny_dir.batches, tmp_path, shared_out=False)
    try:
        runs = rl.wait_all(runners, WAIT)
        rl.assert_no_problems(rl.campaign_problems(url, campaign, runs, RUNNERS), runs)
    finally:
        rl.kill_all(runners)
        rl.delete_campaign(url, campaign)


@pytest.mark.timeout(WAIT + 60)
@pytest.mark.postgres
def test_three_runners_on_postgres_spend_a_budget_phase_once(cifar_tiny_dir, tmp_path):
    # coarse ends on its budget, 3.5 trials' updates, not on a count: together the three runners
    # overrun it by less than one trial, and every one of them narrows fine from the same trials
    url = fl.pg_url_or_skip()
    campaign = f"budget-{uuid.uuid4().hex[:10]}"
    fl.init_schema(url)
    trial_updates = 2 * 20 * 1  # TINY_PIPELINE: 1 search cycle of n_s = 20
    amount = 3.5 * trial_updates
    flags = [*rl.TINY_PIPELINE, "--coarse-trials", 1000,
             "--set", f"phases.coarse.budget={amount:g} updates"]
    runners = rl.start_runners(RUNNERS, lambda i: rl.pipeline_args(
        url, campaign, cifar_tiny_dir.batches, tmp_path / f"out{i}", flags),
        rl.env_for(tmp_path), tmp_path / "logs")
    try:
        runs = rl.wait_all(runners, WAIT)
        rl.assert_no_problems(
            rl.check_exits(runs) + rl.check_studies(url, campaign)
            + rl.check_budget_phase(url, campaign, "coarse", amount, trial_updates, RUNNERS)
            + rl.check_search_phase(url, campaign, "fine", rl.N_FINE, RUNNERS)
            + rl.check_narrowed(url, campaign, runs) + rl.check_confirm(url, campaign)
            + rl.check_final(url, campaign, rl.N_SEEDS, runs)
            + rl.check_nothing_pending(url, campaign) + rl.check_agree(runs), runs)
    finally:
        rl.kill_all(runners)
        rl.delete_campaign(url, campaign)


@pytest.mark.timeout(KILL_WAIT + 120)
def test_a_runner_killed_mid_coarse_leaves_the_studies_of_one(cifar_tiny_dir, tmp_path):
    url = fl.sqlite_url(tmp_path / "s.db")
    campaign = "killed"
    runners = three_runners(url, campaign, cifar_tiny_dir.batches, tmp_path, shared_out=True)
    victim = runners[-1]
    try:
        # mid-phase: the coarse study has 2 of its 4 trials COMPLETE
        fl.wait_for(lambda: sum(s == "COMPLETE" for s in
                                fl.poll_trials(url, f"{campaign}-coarse").values()) >= 2
                    or victim.proc.poll() is not None, 180, "2 COMPLETE coarse trials")
        assert victim.proc.poll() is None, rl.finished(victim).tail()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=30)
        runs = rl.wait_all(runners, KILL_WAIT)
    finally:
        rl.kill_all(runners)
    assert runs[-1].returncode == -signal.SIGKILL
    rl.assert_no_problems(rl.campaign_problems(url, campaign, runs[:-1], RUNNERS, killed=1), runs)


@pytest.mark.timeout(WAIT + 60)
def test_a_narrowed_phase_never_replays_its_source_phases_draws(cifar_tiny_dir, tmp_path):
    # fine narrows coarse by ± 10 decades: λ's range is coarse's own (clipped), so fine's random
    # startup trials (TPE's first 4; fine has 3) drew coarse's λ values when both phases seeded
    # trial n alike. Two runners: neither replays the other's draws either.
    url = fl.sqlite_url(tmp_path / "s.db")
    flags = [*rl.TINY_PIPELINE, "--set", "phases.fine.narrow.margin=10"]
    runners = rl.start_runners(2, lambda i: rl.pipeline_args(
        url, "draws", cifar_tiny_dir.batches, tmp_path / f"out{i}", flags),
        rl.env_for(tmp_path), tmp_path / "logs")
    try:
        runs = rl.wait_all(runners, WAIT)
    finally:
        rl.kill_all(runners)
    rl.assert_no_problems(
        rl.check_exits(runs) + rl.check_search_phase(url, "draws", "coarse", rl.N_COARSE, 2)
        + rl.check_search_phase(url, "draws", "fine", rl.N_FINE, 2)
        + rl.check_narrowed(url, "draws", runs, margin=10) + rl.check_confirm(url, "draws"),
        runs)
    (coarse, _), (fine, attrs) = rl.load(url, "draws", "coarse"), rl.load(url, "draws", "fine")
    assert [(p["low"], p["high"]) for p in attrs["space"]] == [(1e-5, 1e-1)]  # did not narrow
    drawn = [{t.params["lam"] for t in trials if t.params} for trials in (coarse, fine)]
    assert len(drawn[1]) >= rl.N_FINE and not drawn[0] & drawn[1], drawn

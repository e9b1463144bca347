"""The search layer: the fine-range rule, the objective's trials, resume, seeds, divergence, and
scripts/search.py (coarse → fine → status, bad input, parallel workers, PostgreSQL).

In-process tests run one-phase campaigns (search.core.run_phase) on the tiny synthetic data into a tmp_path SQLite
file; script tests run scripts/search.py as users do, on the tiny CIFAR-10 (tests/conftest.py).
Known bugs are xfail(strict=True) with the culprit in the reason: they fail today, and strict
mode reports the day one is fixed.
"""
import contextlib
import dataclasses
import json
import math
import multiprocessing
import sqlite3
import uuid

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import faultlib as fl
from clr_lambda_search.model.errors import ConfigError, InputError
from clr_lambda_search.model.train import TrainConfig
from clr_lambda_search.search.campaign import Campaign, with_phase
from clr_lambda_search.search.core import run_context, run_phase
from clr_lambda_search.search.phases import SearchPhase
from clr_lambda_search.search.samplers import trial_seed
from clr_lambda_search.search.space import Float, narrow, on_border, parse_values
from clr_lambda_search.search.study import open_storage

# A trial on tiny_data (53 × 20 train) takes a few milliseconds with this protocol.
TINY_CONFIG = TrainConfig(m=10, n_batch=10, n_s=5, cycles=1, evals_per_cycle=2,
                          eval_train_samples=0, dtype="float64")
LAM = Float("lam", 1e-5, 1e-1, log=True)  # the report's coarse λ space
ATTRS = ("val_acc", "val_acc_std", "val_accs", "val_loss", "train_acc", "steps", "seconds", "seeds")


# ---------------------------------------------------------------------------------------------
# search.space


@pytest.mark.parametrize("lams", [[1e-3, 1e-2], [3e-5], [1e-5, 1e-1], [2e-2, 1.1e-5, 7e-4]])
def test_narrowed_range_lies_inside_the_coarse_bounds(lams):
    p = narrow(LAM, lams, 0.25)
    # the narrowed range never leaves the coarse range, and it is a real interval
    assert LAM.low <= p.low < p.high <= LAM.high
    # it covers every λ it was derived from
    assert p.low <= min(lams) and max(lams) <= p.high


def test_narrowed_range_spans_the_lams_with_the_margin():
    p = narrow(LAM, [1e-2, 1e-3, 4e-3], margin=0.25)
    # from the smallest to the largest λ, widened by exactly 0.25 decade on each side (log10)
    assert math.log10(p.low) == pytest.approx(-3.25, abs=1e-12)
    assert math.log10(p.high) == pytest.approx(-1.75, abs=1e-12)
    # one λ: a range of 2·margin decades centred on it
    p = narrow(LAM, [1e-3], margin=0.5)
    assert p.low == pytest.approx(10 ** -3.5, rel=1e-12)
    assert p.high == pytest.approx(10 ** -2.5, rel=1e-12)


def test_narrowed_range_is_clipped_to_the_bounds():
    # λ near both borders: the margin would leave [1e-5, 1e-1]; the ends are clipped to it
    p = narrow(LAM, [2e-5, 6e-2], margin=0.5)
    assert p.low == pytest.approx(1e-5, rel=1e-12) and p.high == pytest.approx(1e-1, rel=1e-12)
    # other bounds are honoured too, one side clipped and the other not
    p = narrow(Float("lam", 1e-4, 1.1e-3, log=True), [1e-3], margin=0.25)
    assert p.low == pytest.approx(10 ** -3.25, rel=1e-12) and p.high == pytest.approx(1.1e-3, rel=1e-12)


@pytest.mark.parametrize("text", ["", ",", "a,b", "1e-3;2e-3", "1e-3,x", "nan", "1e-3,inf", "-inf"])
def test_parse_values_rejects_malformed_lists(text):
    # every malformed or non-finite list is a ConfigError (one line, exit 2 in the scripts) ...
    with pytest.raises(ConfigError) as e:
        parse_values(text)
    # ... whose message quotes the flag, so the user knows what to fix
    assert "--values" in str(e.value)


def test_parse_values_sorts_and_deduplicates():
    assert parse_values("2e-3, 1e-3,1e-3") == [1e-3, 2e-3]


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-1e-3, 1e-2), (1e-2, 1e-2), (1e-1, 1e-3)])
def test_param_rejects_bad_bounds(low, high):
    # low ≤ 0 on a log scale, and low ≥ high, are refused at construction
    with pytest.raises(ConfigError):
        Float("lam", low, high, log=True)


def test_param_accepts_a_valid_range():
    assert Float("lam", 1e-5, 1e-1, log=True).low == 1e-5
    assert Float("eta_max", 0.0, 1.0).high == 1.0  # 0 is fine on a linear scale


def test_on_border():
    # 4 decades: 5% is 0.2 decade
    assert on_border(LAM, 1e-5) and on_border(LAM, 1e-1)  # the borders themselves
    assert on_border(LAM, 1.5e-5) and on_border(LAM, 0.07)  # within 0.2 decade
    assert not on_border(LAM, 1e-3)  # the middle
    assert not on_border(LAM, 2e-5) and not on_border(LAM, 0.05)  # 0.3 decade inside


# ---------------------------------------------------------------------------------------------
# search.objective + search.core.run_phase, in-process on tiny_data


def tiny_spec(campaign="t", n_trials=2, repeats=1, config=TINY_CONFIG, space=None, seed=0,
              pruner="none", phase="coarse", sampler="random", grid=None):
    """A one-phase campaign (its study: <campaign>-<phase>)."""
    return Campaign(name=campaign, phases=(SearchPhase(
        name=phase, n_trials=n_trials, space=space or (LAM,), sampler=sampler, grid=grid,
        pruner=pruner, repeats=repeats),), seed=seed, config=tuple(vars(config).items()))


def study_of(campaign):
    """The study name of a one-phase campaign."""
    return campaign.phases[0].study_name(campaign.name)


def run_one(campaign, storage, data, **kw):
    """Run (or resume) the one phase of campaign; the study."""
    return run_phase(campaign, campaign.phases[0].name, data, storage, **kw)[0]


def open_one(campaign, storage):
    """Create or resume the one phase's study (no trial run)."""
    return campaign.phases[0].open(run_context(campaign, None, storage))


def run_tiny(tmp_path, data, **kw):
    url = fl.sqlite_url(tmp_path / "s.db")
    spec = tiny_spec(**kw)
    run_one(spec, open_storage(url), data)
    return url, study_of(spec)


def test_two_trial_study_records_its_attrs(tmp_path, tiny_data):
    url, name = run_tiny(tmp_path, tiny_data)
    trials, study_attrs = fl.load_trials(url, name)
    # exactly the two requested trials ran, and both completed
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        # every documented user attr is present
        assert set(ATTRS) <= set(t.user_attrs), sorted(t.user_attrs)
        # the objective value is the recorded mean validation accuracy, a fraction in [0, 1]
        assert t.value == t.user_attrs["val_acc"] and 0 <= t.value <= 1
        assert t.user_attrs["seeds"] == [0] and len(t.user_attrs["val_accs"]) == 1
        assert t.user_attrs["val_acc_std"] == 0.0  # one seed: no spread
        assert t.user_attrs["steps"] == 2 * TINY_CONFIG.n_s * TINY_CONFIG.cycles
        assert np.isfinite(t.user_attrs["val_loss"]) and t.user_attrs["seconds"] >= 0
        # λ was drawn from the coarse space
        assert LAM.low <= t.params["lam"] <= LAM.high
    # the study records the protocol it was run with (what a resume is checked against)
    assert study_attrs["phase"] == "coarse" and study_attrs["repeats"] == 1
    assert study_attrs["config"]["n_s"] == TINY_CONFIG.n_s and "lam" not in study_attrs["config"]


def test_repeats_average_the_seeds(tmp_path, tiny_data):
    url, name = run_tiny(tmp_path, tiny_data, repeats=2)
    trials, _ = fl.load_trials(url, name)
    assert len(fl.complete(trials)) == 2
    for t in trials:
        accs = t.user_attrs["val_accs"]
        # two seeds (train seed 0 and 1), one accuracy each
        assert t.user_attrs["seeds"] == [0, 1] and len(accs) == 2
        # the objective is their mean, and their (population) std is stored beside it
        assert t.value == pytest.approx(np.mean(accs), abs=1e-12)
        assert t.user_attrs["val_acc_std"] == pytest.approx(np.std(accs), abs=1e-12)


def _snapshot(trials):
    return [(t.number, t.state, t.params, t.value, t.datetime_complete) for t in trials]


def test_resume_runs_to_n_complete_and_keeps_earlier_trials(tmp_path, tiny_data):
    url, name = run_tiny(tmp_path, tiny_data, n_trials=2)
    first, _ = fl.load_trials(url, name)
    assert len(fl.complete(first)) == 2

    run_tiny(tmp_path, tiny_data, n_trials=3)
    second, _ = fl.load_trials(url, name)
    # "run to N": the study now holds exactly 3 complete trials, not 2 + 3
    assert len(fl.complete(second)) == 3 and len(second) == 3
    # the first two trials are untouched (same number, λ, value and completion time)
    assert _snapshot(second[:2]) == _snapshot(first)
    # the resumed run drew a new λ: it does not replay the first run's sequence (optuna #3255)
    assert second[2].params["lam"] not in {t.params["lam"] for t in first}

    run_tiny(tmp_path, tiny_data, n_trials=3)
    third, _ = fl.load_trials(url, name)
    # running again with the same target does nothing at all
    assert _snapshot(third) == _snapshot(second)


def test_resume_with_another_protocol_is_refused(tmp_path, tiny_data):
    url, name = run_tiny(tmp_path, tiny_data, n_trials=1)
    other = dataclasses.replace(TINY_CONFIG, n_s=6)
    # mixing trials of two protocols in one study is refused with a message naming the fix
    with pytest.raises(InputError, match="--campaign"):
        run_tiny(tmp_path, tiny_data, n_trials=2, config=other)
    trials, _ = fl.load_trials(url, name)
    assert len(trials) == 1  # and nothing ran


def test_trial_seed_depends_on_study_seed_and_trial_number_only():
    base = trial_seed(0, 0)
    # deterministic: the λ of trial n is reproducible whichever worker or process runs it
    assert trial_seed(0, 0) == base
    # another trial number or another study seed: another seed (no two trials replay one draw)
    others = [trial_seed(0, n) for n in range(1, 6)] + [trial_seed(1, 0), trial_seed(2, 0)]
    assert len({base, *others}) == 8
    # valid for numpy / Optuna samplers (an unsigned 32-bit integer)
    assert all(0 <= s < 2 ** 32 for s in [base, *others])


class _PrunesFrom(optuna.pruners.BasePruner):
    """Says "prune" at every report from `step` on, to every trial or to odd-numbered ones."""

    def __init__(self, step, odd_only=False):
        self.step, self.odd_only = step, odd_only

    def prune(self, study, trial):
        return (trial.last_step is not None and trial.last_step >= self.step
                and (trial.number % 2 == 1 or not self.odd_only))


# Two cycles of n_s = 5 on tiny_data: reports at 5, 10, 15 and 20 (the last).
PRUNED_CONFIG = dataclasses.replace(TINY_CONFIG, cycles=2)
PRUNERS = {
    "at-the-last-report": _PrunesFrom(PRUNED_CONFIG.total_steps),
    "from-the-second-report": _PrunesFrom(10, odd_only=True),
    # asked from step 20 on only, and prunes a value equal to the median
    "median": {"name": "MarginMedianPruner", "margin": -0.001, "n_startup_trials": 1,
               "n_warmup_steps": 15},
    "successive-halving": {"name": "SuccessiveHalvingPruner", "min_resource": 5,
                           "reduction_factor": 2},
    "hyperband": {"name": "HyperbandPruner", "min_resource": 5, "max_resource": 20,
                  "reduction_factor": 2},
}


@pytest.mark.parametrize("name", PRUNERS)
def test_a_pruner_never_prunes_at_the_last_report(tmp_path, tiny_data, name):
    """A trial that trained to its end is judged by its final value, whatever the pruner says
    there; the pruner still stops trials before it (the aggressive ones here prune at once)."""
    storage = open_storage(fl.sqlite_url(tmp_path / "s.db"))
    # λ up to 10: values that differ on tiny_data, for the pruners that rank trials
    study = run_one(tiny_spec(n_trials=4, config=PRUNED_CONFIG, pruner=PRUNERS[name],
                              space=(Float("lam", 1e-3, 10, log=True),)), storage, tiny_data)
    last = PRUNED_CONFIG.total_steps
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(max(t.intermediate_values) < last for t in pruned), \
        [(t.number, sorted(t.intermediate_values)) for t in pruned]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and all(last in t.intermediate_values for t in done)
    if name == "at-the-last-report":
        assert not pruned  # it says prune only at the end: nothing is thrown away
    if name == "from-the-second-report":
        assert pruned  # earlier, it still prunes


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_diverging_trial_fails_and_the_phase_completes(tmp_path, tiny_data):
    # η_max = 1e3 in float32 diverges on tiny_data for λ ≳ 0.1 and not for λ ≲ 0.05: with λ drawn
    # from [1e-3, 1e2] and sampler seed 6 (λ 0.843, 0.04, 0.001, 0.374, 0.004), two trials diverge
    # and three complete.
    config = dataclasses.replace(TINY_CONFIG, eta_max=1e3, dtype="float32")
    url, name = run_tiny(tmp_path, tiny_data, n_trials=3, config=config,
                         space=(Float("lam", 1e-3, 1e2, log=True),), seed=6)
    trials, _ = fl.load_trials(url, name)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # at least one trial diverged: it is FAIL, and its failure attr says why
    assert failed, [(t.params, t.state) for t in trials]
    assert all("diverged" in t.user_attrs.get("failure", "") for t in failed)
    # the worker survived it: the phase still ended with exactly its 3 complete trials
    assert len(fl.complete(trials)) == 3
    # and the diverged λ are the large ones (the failure is the λ's, not a random crash)
    assert min(t.params["lam"] for t in failed) > max(t.params["lam"] for t in fl.complete(trials))


def _run_phase_in_step(url, spec, data, barrier):
    """run_one, but the worker loop starts only once every process has built its sampler:
    the deterministic form of "two processes load the study at the same moment"."""
    from clr_lambda_search.search import workers

    original = workers.work

    def work(*args, **kwargs):
        barrier.wait(timeout=60)
        return original(*args, **kwargs)

    workers.work = work  # this forked child only
    run_one(spec, open_storage(url), data)


@pytest.mark.timeout(60)
def test_processes_joining_a_study_together_draw_distinct_lams(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    spec = tiny_spec(n_trials=4)
    run_one(with_phase(spec, "coarse", n_trials=1), open_storage(url), tiny_data)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_run_phase_in_step, args=(url, spec, tiny_data, barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=50)
    # both processes finished the phase together
    assert [p.exitcode for p in procs] == [0, 0]
    trials, _ = fl.load_trials(url, study_of(spec))
    assert len(fl.complete(trials)) == 4
    # no λ was trained twice
    assert fl.duplicated_lams(trials) == []


def _run_phase_child(url, spec, data, opts):
    run_one(spec, open_storage(url, **opts), data, storage_opts=opts)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the bare ask() below
def test_a_trial_orphaned_before_its_first_heartbeat_is_retried(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    opts = {"heartbeat_interval": 1, "grace_period": 2}
    spec = tiny_spec(n_trials=2)
    storage = open_storage(url, **opts)
    # a worker that died right after study.ask(): a RUNNING trial without any heartbeat
    open_one(spec, storage).ask()
    storage.remove_session()
    storage.engine.dispose()
    child = multiprocessing.get_context("fork").Process(
        target=_run_phase_child, args=(url, spec, tiny_data, opts))
    child.start()
    # 2 tiny trials + a 2 s grace period + 1 s polls: ~4 s when it works; 30 s on a loaded machine
    child.join(timeout=30)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    trials, _ = fl.load_trials(url, study_of(spec))
    # the orphan was failed like any dead worker's trial ...
    assert trials[0].state == TrialState.FAIL, trials[0].state
    # ... and the phase completed its 2 trials instead of waiting for the orphan forever
    assert not hung and child.exitcode == 0
    assert len(fl.complete(trials)) == 2


def _study_with_a_dead_trial(tmp_path, failure=None):
    """A study whose trial 0 (λ = 0.5) is FAIL as a dead worker's trial is once Optuna has failed
    it, but never re-queued (the worker failing it was killed between the two commits)."""
    import optuna
    from optuna.distributions import FloatDistribution

    storage = open_storage(fl.sqlite_url(tmp_path / "s.db"), heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="r", storage=storage, direction="maximize")
    attrs = {"failure": failure} if failure else {}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.FAIL, params={"lam": 0.5}, user_attrs=attrs,
        distributions={"lam": FloatDistribution(1e-3, 1.0, log=True)}))
    return study


def _lam_objective(trial):
    return trial.suggest_float("lam", 1e-3, 1.0, log=True)


def test_a_dead_trial_that_was_not_requeued_is_requeued_once(tmp_path):
    from clr_lambda_search.search.recovery import recover_trials
    from clr_lambda_search.search.study import retried_from

    study = _study_with_a_dead_trial(tmp_path)
    for _ in range(3):  # every worker's pass before every trial: re-queued once, not thrice
        recover_trials(study)
    retries = [t for t in study.get_trials() if retried_from(t) == 0]
    assert [(t.state, t.params["lam"]) for t in retries] == [(TrialState.WAITING, 0.5)]


def test_a_trial_that_failed_for_a_reason_is_not_requeued(tmp_path):
    from clr_lambda_search.search.recovery import recover_trials

    study = _study_with_a_dead_trial(tmp_path, failure="interrupted (Ctrl-C)")
    recover_trials(study)
    assert len(study.get_trials()) == 1


def test_a_terminated_trial_is_requeued_once_with_its_lam(tmp_path):
    from clr_lambda_search.search.recovery import recover_trials
    from clr_lambda_search.search.study import retried_from

    study = _study_with_a_dead_trial(tmp_path, failure="terminated")  # SIGTERM: retried
    for _ in range(2):
        recover_trials(study)
    retries = [t for t in study.get_trials() if retried_from(t) == 0]
    assert [(t.state, t.params["lam"]) for t in retries] == [(TrialState.WAITING, 0.5)]


def _claim_all(url, barrier, results):
    storage = open_storage(url)
    ids = [t._trial_id for t in storage.get_all_trials(storage.get_all_studies()[0]._study_id)]
    barrier.wait()
    results.put([i for i in ids if storage.set_trial_state_values(i, TrialState.RUNNING)])
    storage.engine.dispose()


@pytest.mark.timeout(120)
def test_a_queued_trial_is_claimed_by_one_process_only(tmp_path):
    """Optuna reads WAITING and writes RUNNING in two statements: on SQLite two workers could
    both take one queued trial (search.study.ClaimingRDBStorage makes it one UPDATE)."""
    import optuna

    url = fl.sqlite_url(tmp_path / "q.db")
    storage = open_storage(url)
    study = optuna.create_study(study_name="q", storage=storage)
    for i in range(40):
        study.enqueue_trial({"lam": 0.1 + i}, skip_if_exists=False)
    storage.engine.dispose()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    claims = sum((results.get(timeout=60) for _ in procs), [])
    for p in procs:
        p.join(timeout=60)
    assert sorted(claims) == sorted(set(claims)) and len(claims) == 40  # each exactly once
    finished = study.get_trials()[0]
    study.tell(finished.number, 1.0)  # a finished trial cannot be claimed: Optuna's error
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        open_storage(url).set_trial_state_values(finished._trial_id, TrialState.RUNNING)


def test_a_dead_trial_requeued_twice_runs_once(tmp_path):
    """Two workers both re-queued trial 0: the first copy runs, the second is failed on pickup
    as a duplicate (before it trains), and the phase still ends with its target of COMPLETE
    trials."""
    import optuna

    from clr_lambda_search.search import record
    from clr_lambda_search.search.workers import TrialTarget, work
    from clr_lambda_search.search.study import retried_from

    study = _study_with_a_dead_trial(tmp_path)
    callback = study._storage.get_heartbeat_stale_trial_callback()
    for _ in range(2):
        callback(study, study.get_trials()[0])
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    work(study, _lam_objective, TrialTarget(2))
    trials = study.get_trials()
    first, second = (t for t in trials if retried_from(t) == 0)
    assert first.state == TrialState.COMPLETE and first.value == 0.5
    # (a duplicate was PRUNED before the campaign core: it is now FAIL, failure DUPLICATE)
    assert second.state == TrialState.FAIL
    assert second.user_attrs["failure"] == record.DUPLICATE
    assert len(fl.complete(trials)) == 2 and fl.duplicated_lams(trials) == []


def test_a_retry_still_queued_when_the_phase_is_met_is_not_left_waiting(tmp_path):
    """The same double re-queue, but the first copy's result meets the phase: the second copy
    is still WAITING when every worker sees the goal met (a CI run of test_runners.py left one
    so). The worker that sees it takes it and ends it as bookkeeping, untrained."""
    import optuna

    from clr_lambda_search.search import record
    from clr_lambda_search.search.workers import TrialTarget, work

    study = _study_with_a_dead_trial(tmp_path)
    callback = study._storage.get_heartbeat_stale_trial_callback()
    for _ in range(2):
        callback(study, study.get_trials()[0])
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    trained = []
    work(study, lambda t: trained.append(t.number) or _lam_objective(t), TrialTarget(1))
    trials = study.get_trials()
    assert [t.number for t in trials if t.state == TrialState.WAITING] == []
    assert trained == [1]  # the second copy (trial 2) stopped before it trained
    assert trials[2].state == TrialState.FAIL and record.is_bookkeeping(trials[2])
    assert len(fl.complete(trials)) == 1


def test_an_objective_error_is_recorded_as_the_failure(tmp_path):
    """A trial that fails by an exception says so: only a silent FAIL means "the worker died"."""
    import optuna

    from clr_lambda_search.search.workers import TrialTarget, _guard_trial

    study = optuna.create_study(storage=open_storage(fl.sqlite_url(tmp_path / "s.db")))

    def broken(trial):
        raise ValueError("bad luck")
    study.optimize(_guard_trial(broken, TrialTarget(5)), n_trials=1,
                   catch=(ValueError,))
    trial = study.get_trials()[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["failure"] == "ValueError: bad luck"


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning",
                            "ignore:`GridSampler` is re-evaluating:UserWarning")
def test_values_with_a_diverging_value_train_each_value_once(tmp_path, tiny_data):
    # λ = 1e3 diverges at η_max 1e3 on tiny_data (float32), λ = 1e-4 does not
    config = dataclasses.replace(TINY_CONFIG, eta_max=1e3, dtype="float32")
    url = fl.sqlite_url(tmp_path / "s.db")
    spec = tiny_spec(campaign="g", phase="fine", n_trials=2, config=config,
                     space=(Float("lam", 1e-4, 1e3, log=True),), sampler="grid",
                     grid={"lam": [1e-4, 1e3]})
    run_one(spec, open_storage(url), tiny_data)
    trials, _ = fl.load_trials(url, study_of(spec))
    # each listed λ ran exactly once: one COMPLETE, one FAIL (diverged)
    assert sorted(t.params["lam"] for t in trials) == [1e-4, 1e3], \
        [(t.params["lam"], t.state.name) for t in trials]
    assert fl.duplicated_lams(trials) == []


# ---------------------------------------------------------------------------------------------
# A fresh storage opened by several processes at once (DESIGN.md: "concurrent first creation
# races"). Four processes meet at a barrier, then call open_storage on one new SQLite file.


def _open_at_barrier(url, barrier, results):
    barrier.wait()
    try:
        storage = open_storage(url)
        storage.engine.dispose()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports whatever the race raised
        results.put(f"{type(e).__name__}: {e}")


def open_at_once(url, n=4):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_at_barrier, args=(url, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return [r for r in out if r != "ok"]


@pytest.mark.timeout(120)
def test_fresh_sqlite_storage_opened_by_several_processes_at_once(tmp_path):
    errors = []
    for i in range(3):  # three fresh files: the race is timing-dependent, three rounds make it sure
        errors += open_at_once(fl.sqlite_url(tmp_path / f"fresh{i}.db"))
    # every process opens the storage; none sees a half-created schema
    assert errors == []


def test_sqlite_studies_are_in_write_ahead_log_mode(tmp_path):
    """Readers never wait for a writer (two workers on one file: see search.study); the mode is
    the file's, so every later connection, ours or not, has it."""
    path = tmp_path / "s.db"
    storage = open_storage(fl.sqlite_url(path))
    storage.engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _create_at_barrier(url, spec, barrier, results):
    storage = open_storage(url)
    barrier.wait()
    try:
        open_one(spec, storage)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports whatever the race raised
        results.put(f"{type(e).__name__}: {e}")
    finally:
        storage.engine.dispose()


@pytest.mark.timeout(120)
def test_processes_creating_one_study_together_all_resume_it(tmp_path):
    errors = []
    spec = tiny_spec()
    for i in range(3):  # ~8 of 10 rounds of 4 processes fail here: three rounds make it sure
        url = fl.sqlite_url(tmp_path / f"s{i}.db")
        fl.init_schema(url)  # the schema exists: only the study's creation races
        ctx = multiprocessing.get_context("fork")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_create_at_barrier, args=(url, spec, barrier, results))
                 for _ in range(4)]
        for p in procs:
            p.start()
        errors += [r for r in (results.get(timeout=60) for _ in procs) if r != "ok"]
        for p in procs:
            p.join(timeout=60)
    # every process gets the study: one creates it, the others resume it
    assert errors == []


# ---------------------------------------------------------------------------------------------
# scripts/search.py on the tiny CIFAR-10


@pytest.fixture(scope="module")
def campaign(cifar_tiny_dir, tmp_path_factory):
    """coarse (4 trials) → fine (3, derived range) → status --json → fine --values on another
    campaign, all in one storage. Returns {step: CompletedProcess} plus the storage URL."""
    base = tmp_path_factory.mktemp("campaign")
    env = fl.script_env(base)
    url = fl.sqlite_url(base / "s.db")
    data = cifar_tiny_dir.batches
    out = {"url": url}
    out["coarse"] = fl.run(fl.search_args("coarse", url, "c", data, "--n-trials", 4, *fl.TINY), env)
    out["fine"] = fl.run(fl.search_args("fine", url, "c", data, "--n-trials", 3, *fl.TINY), env)
    out["status"] = fl.run(fl.search_args("status", url, "c", None, "--json"), env)
    out["values"] = fl.run(fl.search_args("fine", url, "v", data, "--values", "1e-4,1e-3",
                                          *fl.TINY), env)
    out["values_status"] = fl.run(fl.search_args("status", url, "v", None, "--json"), env)
    return out


@pytest.mark.timeout(180)
def test_coarse_then_fine_records_the_fine_range(campaign):
    for step in ("coarse", "fine", "status"):
        # each step succeeds
        assert campaign[step].returncode == 0, (step, campaign[step].stderr[-2000:])
    coarse, _ = fl.load_trials(campaign["url"], "c-coarse")
    fine, fine_attrs = fl.load_trials(campaign["url"], "c-fine")
    assert len(fl.complete(coarse)) == 4 and len(fl.complete(fine)) == 3
    nr = fine_attrs["narrowed"]
    # how the fine space was derived is recorded in the fine study: source study, trials, rule
    assert {"from_study", "from_trials", "top_k", "margin", "rule"} <= set(nr)
    assert nr["from_study"] == "c-coarse" and len(nr["from_trials"]) == 3
    # it is the rule applied to the 3 best coarse trials (not typed by hand)
    best3 = sorted(fl.complete(coarse), key=lambda t: -t.value)[:3]
    assert sorted(nr["from_trials"]) == sorted(t.number for t in best3)
    expected = narrow(LAM, [t.params["lam"] for t in best3], 0.25)
    (fr,) = fine_attrs["space"]
    assert fr["low"] == pytest.approx(expected.low, rel=1e-12)
    assert fr["high"] == pytest.approx(expected.high, rel=1e-12)
    # the fine trials searched inside it
    assert all(fr["low"] <= t.params["lam"] <= fr["high"] for t in fine)
    # and the fine run printed it
    assert f"lam ∈ [{fr['low']:.4g}, {fr['high']:.4g}] (log)" in campaign["fine"].stdout


@pytest.mark.timeout(180)
def test_status_json_lists_studies_best_and_trials(campaign):
    assert campaign["status"].returncode == 0, campaign["status"].stderr[-2000:]
    report = json.loads(campaign["status"].stdout)  # exactly one JSON object on stdout
    studies = report["studies"]
    assert [s["name"] for s in studies] == ["c-coarse", "c-fine"]  # coarse first
    for s in studies:
        trials, _ = fl.load_trials(campaign["url"], s["name"])
        done = fl.complete(trials)
        best = max(done, key=lambda t: t.value)
        # best is the highest validation accuracy of the study, with its parameters
        assert s["best"]["val_acc"] == best.value
        assert s["best"]["params"] in [t.params for t in done if t.value == best.value]
        # every trial is listed once with number, state, params and val acc, matching the storage
        rows = {r["number"]: r for r in s["trials"]}
        assert sorted(rows) == [t.number for t in trials]
        for t in trials:
            r = rows[t.number]
            assert (r["state"], r["params"], r["val_acc"]) == (t.state.name, t.params, t.value)


@pytest.mark.timeout(180)
def test_fine_with_values_runs_exactly_those_lams(campaign):
    assert campaign["values"].returncode == 0, campaign["values"].stderr[-2000:]
    trials, attrs = fl.load_trials(campaign["url"], "v-fine")
    # a grid over the two listed values: each ran once, nothing else ran
    assert sorted(t.params["lam"] for t in trials) == [1e-4, 1e-3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert attrs["sampler"] == "grid" and attrs["grid"] == {"lam": [1e-4, 1e-3]}
    # status works on a fine-only campaign (no coarse study)
    report = json.loads(campaign["values_status"].stdout)
    assert [s["name"] for s in report["studies"]] == ["v-fine"]


@pytest.mark.timeout(120)
def test_fine_without_coarse_is_one_line_exit_2_and_creates_nothing(cifar_tiny_dir, tmp_path):
    env = fl.script_env(tmp_path)
    db = tmp_path / "none.db"
    r = fl.run(fl.search_args("fine", fl.sqlite_url(db), "c", cifar_tiny_dir.batches, *fl.TINY),
               env)
    lines = fl.stderr_lines(r.stderr)
    # bad input: exit 2, one line that starts with "error:", no traceback
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    # the storage file was not created
    assert not db.exists()


@pytest.mark.timeout(120)
def test_fine_of_unknown_campaign_creates_no_study(campaign, cifar_tiny_dir, tmp_path):
    env = fl.script_env(tmp_path)
    url = campaign["url"]
    before = fl.study_names(url)
    r = fl.run(fl.search_args("fine", url, "nope", cifar_tiny_dir.batches, *fl.TINY), env)
    lines = fl.stderr_lines(r.stderr)
    # exit 2, one line naming the missing study
    assert r.returncode == 2 and len(lines) == 1 and "nope-coarse" in lines[0], lines
    # no half-written fine study is left behind
    assert fl.study_names(url) == before


@pytest.mark.timeout(180)
def test_parallel_workers_on_one_sqlite_file(cifar_tiny_dir, tmp_path):
    env = fl.script_env(tmp_path)
    url = fl.sqlite_url(tmp_path / "w.db")
    for workers, n in ((2, 6), (4, 8)):
        campaign = f"w{workers}"
        r = fl.run(fl.search_args("coarse", url, campaign, cifar_tiny_dir.batches, "--workers",
                                  workers, "--n-trials", n, "--pruner", "none", *fl.TINY), env)
        assert r.returncode == 0, r.stderr[-2000:]
        # no lock or creation-race error reached the user
        assert fl.race_errors(r.stderr) == []
        trials, _ = fl.load_trials(url, f"{campaign}-coarse")
        done = fl.complete(trials)
        # exactly n complete trials (surplus ones are pruned and marked), with distinct numbers ...
        assert len(done) == n
        assert len({t.number for t in done}) == n
        # ... and distinct λ: parallel samplers did not replay one sequence
        assert fl.duplicated_lams(trials) == []
        # nothing is left RUNNING or WAITING
        assert fl.unfinished(trials) == []


@pytest.mark.timeout(180)
@pytest.mark.postgres
def test_two_processes_on_postgresql(cifar_tiny_dir, tmp_path):
    url = fl.pg_url_or_skip()
    env = fl.script_env(tmp_path)
    campaign = f"pg-{uuid.uuid4().hex[:12]}"  # unique per run: the database outlives the test
    n = 10
    fl.init_schema(url)  # the fresh-schema creation race is covered by its own (SQLite) test
    # trials of ~0.8 s (n_s 400): the first process is far from done when the second joins
    args = fl.search_args("coarse", url, campaign, cifar_tiny_dir.batches, "--n-trials", n,
                          "--pruner", "none", "--n-val", "20", "--n-s", "400", "--cycles", "1",
                          "--n-batch", "20")
    study = f"{campaign}-coarse"
    # The second process starts once the first runs its first trial: started at the same instant
    # they hit the known races of the study's creation and of the sampler seed (see
    # test_processes_creating_one_study_together_all_resume_it and
    # test_processes_joining_a_study_together_draw_distinct_lams); here they share the storage.
    procs = [fl.start(args, env)]
    try:
        fl.wait_for_new_running(url, study, set(), timeout=90, proc=procs[0])
        procs.append(fl.start(args, env))
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            fl.stop(p)
    for p, (out, err) in zip(procs, results):
        # both processes succeed, without lock or creation-race errors
        assert p.returncode == 0, err[-2000:]
        assert fl.race_errors(err) == []
    # both trained: the second did not just find the phase complete
    assert all("INFO clr_lambda_search.search.objective: trial" in err for _, err in results), \
        [fl.stderr_lines(err)[-6:] for _, err in results]
    trials, _ = fl.load_trials(url, study)
    done = fl.complete(trials)
    # exactly n complete trials between them, with distinct numbers, nothing left RUNNING/WAITING
    assert len(done) == n and len({t.number for t in done}) == n
    assert fl.unfinished(trials) == []
    # no λ trained twice
    assert fl.duplicated_lams(trials) == []


def test_a_study_deleted_while_the_campaign_is_listed_is_read_again(tmp_path, monkeypatch):
    # another runner releasing its storage lock deletes that lock's study while Optuna reads
    # every study's trials: Optuna raises KeyError, and the listing is read again
    from clr_lambda_search.search import study as study_module

    storage = open_storage(fl.sqlite_url(tmp_path / "s.db"))
    optuna.create_study(study_name="x-coarse", storage=storage)
    real, calls = optuna.get_all_study_summaries, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("Record does not exist.")
        return real(*args, **kwargs)
    monkeypatch.setattr(optuna, "get_all_study_summaries", flaky)
    assert [s.study_name for s in study_module.campaign_studies(storage, "x")] == ["x-coarse"]
    assert len(calls) == 2

"""Storages written by an earlier release (commit 03d5f40, tests/data/README.md) still resume: the
same pipeline command on a copy of them finishes the campaign without rerunning what was done.
And release 0.1.0's storage and results folder (release-0.1.0.tar.xz) work with this one.

- old-complete.db, a finished campaign: no search or confirm trial is added or changed, the
  verdict is the recorded one, and the final run (its results folder is not kept with the
  fixture, so it is trained again) records one trial per seed of the recorded pick.
- old-fine-interrupted.db, killed during the fine phase's second trial: coarse is untouched,
  fine keeps its recorded range and its first trial and completes to its n_trials (the killed
  trial failed, not left RUNNING, and retried once with its λ), then confirm and the final run
  follow.

- release-0.1.0.tar.xz, a finished campaign and its results folder: `clr-search status` lists its
  studies and verdict; the pipeline command that made it adds no trial, trains nothing and
  leaves the results folder's files as they were; `clr-search final` reads the recorded run and
  trains nothing; `clr-search dashboard` writes its page with the final run.

The first two end with every runnerlib check of a campaign one runner ran. The tiny CIFAR-10 of the
conftest fixture is the data the fixtures were made on (each phase pins the data's fingerprint:
other data would be refused).
"""
import json
import shutil
import subprocess
import sys

import pytest

import faultlib as fl
import runnerlib as rl
from old_storage import (CAMPAIGN, COMPLETE_DB, INTERRUPTED_DB, N_COARSE, N_FINE, N_SEEDS,
                         PIPELINE_FLAGS, RELEASE_ARCHIVE, RELEASE_FLAGS, pipeline_command,
                         unpack_release)

pytestmark = pytest.mark.integration

DATA = fl.REPO / "tests" / "data"


def trials_of(url, phase):
    """[(number, state, params, value)] and user attrs of <CAMPAIGN>-<phase>."""
    trials, attrs = rl.load(url, CAMPAIGN, phase)
    assert trials is not None, f"{CAMPAIGN}-{phase}: no such study"
    return [(t.number, t.state.name, t.params, t.value) for t in trials], attrs


def resume(fixture, cifar_tiny_dir, tmp_path):
    """Copy the fixture to tmp_path and run the pipeline command that made it on the copy."""
    db = tmp_path / fixture
    shutil.copy(DATA / fixture, db)
    return rerun(fl.sqlite_url(db), cifar_tiny_dir, tmp_path)


def rerun(url, cifar_tiny_dir, tmp_path, out=None, flags=PIPELINE_FLAGS):
    """Run the pipeline command that made the storage at url on it: url, the trials and user
    attrs of each phase before, and the run."""
    before = {p: trials_of(url, p) for p in rl.campaign_study_names_phases(url, CAMPAIGN)}
    command = pipeline_command(url, cifar_tiny_dir.batches, out or tmp_path / "out", flags)
    runner = rl.start_pipeline(command[2:], rl.env_for(tmp_path), tmp_path / "logs", "resumed")
    try:
        (run,) = rl.wait_all([runner], 300)
    finally:
        rl.kill_all([runner])
    return url, before, run


# what a resumed study of 03d5f40 gains: the schema's version, its kind, its trial count and its
# resolved precision
UPGRADE_KEYS = {"record_version", "kind", "n_trials", "precision"}


def assert_record_upgraded(old, new):
    """The old record is kept as it was (read the old form), and only the new form's keys are
    added (write the new)."""
    assert {k: new.get(k) for k in old} == old
    assert set(new) - set(old) <= UPGRADE_KEYS, set(new) - set(old)
    assert new["record_version"] == 2


@pytest.mark.timeout(360)
def test_a_finished_old_campaign_resumes_without_rerunning(cifar_tiny_dir, tmp_path):
    url, before, run = resume(COMPLETE_DB, cifar_tiny_dir, tmp_path)
    assert set(before) == {"coarse", "fine", "confirm", "final"}
    rl.assert_no_problems(rl.check_exits([run]), [run])
    for phase in ("coarse", "fine", "confirm"):  # no trial added, none changed, same records
        trials, attrs = trials_of(url, phase)
        assert trials == before[phase][0], phase
        assert_record_upgraded(before[phase][1], attrs)
    recorded_verdict = before["confirm"][1]["verdict"]
    assert run.summary["verdict"] == recorded_verdict
    assert run.summary["final"]["params"] == recorded_verdict["params"]
    assert len(run.summary["final"]["test_acc"]) == N_SEEDS
    rl.assert_no_problems(rl.campaign_problems(url, CAMPAIGN, [run], 1, n_coarse=N_COARSE,
                                               n_fine=N_FINE, n_seeds=N_SEEDS), [run])


@pytest.mark.timeout(360)
def test_an_old_campaign_killed_in_fine_resumes_and_finishes(cifar_tiny_dir, tmp_path):
    url, before, run = resume(INTERRUPTED_DB, cifar_tiny_dir, tmp_path)
    assert set(before) == {"coarse", "fine"}  # the fixture as README.md describes it
    fine_before, fine_attrs = before["fine"]
    assert [(n, s) for n, s, _, _ in fine_before] == [(0, "COMPLETE"), (1, "RUNNING")]
    rl.assert_no_problems(rl.check_exits([run]), [run])
    coarse, attrs = trials_of(url, "coarse")
    assert coarse == before["coarse"][0]  # finished: not rerun
    assert_record_upgraded(before["coarse"][1], attrs)
    fine, attrs = trials_of(url, "fine")
    # the recorded range is kept (not derived again), the first trial is untouched, the killed
    # one failed, and the phase completed to its n_trials
    assert attrs["space"] == fine_attrs["space"] and attrs["narrowed"] == fine_attrs["narrowed"]
    assert fine[0] == fine_before[0]
    assert fine[1][1] == "FAIL", fine
    assert sum(s == "COMPLETE" for _, s, _, _ in fine) == N_FINE, fine
    # the killed trial was retried once, with the λ it had drawn, and the retry completed
    retries = fl.retries_by_origin(fl.load_trials(url, f"{CAMPAIGN}-fine")[0])
    assert [(t.params, t.state.name) for t in retries.get(1, [])] == [
        (fine_before[1][2], "COMPLETE")], retries
    assert run.summary["phases"][1]["space"] == fine_attrs["space"]
    assert len(run.summary["final"]["test_acc"]) == N_SEEDS
    rl.assert_no_problems(rl.campaign_problems(url, CAMPAIGN, [run], 1, killed=1,
                                               n_coarse=N_COARSE, n_fine=N_FINE,
                                               n_seeds=N_SEEDS), [run])


def clr_search(tmp_path, *args):
    """`python -m clr_lambda_search ARGS --json` from tmp_path; its JSON object."""
    proc = subprocess.run([sys.executable, "-m", "clr_lambda_search", *map(str, args), "--json"],
                          cwd=tmp_path, env=rl.env_for(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def files_of(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.timeout(360)
def test_release_0_1_0_storage_and_results_work(cifar_tiny_dir, tmp_path):
    db, results = unpack_release(DATA / RELEASE_ARCHIVE, tmp_path)
    url, kept = fl.sqlite_url(db), files_of(results)
    assert "final/metrics.json" in kept and "dashboard.html" not in kept  # as README.md says
    recorded = json.loads(kept["final/metrics.json"])

    status = clr_search(tmp_path, "status", "--storage", url, "--campaign", CAMPAIGN)
    by_phase = {s["phase"]: s for s in status["studies"]}
    assert set(by_phase) == {"coarse", "fine", "confirm"}, status
    assert (by_phase["coarse"]["n_complete"], by_phase["fine"]["n_complete"]) == (N_COARSE, N_FINE)
    assert by_phase["fine"]["narrowed"], "the fine range derived by 0.1.0 is shown"

    _, before, run = rerun(url, cifar_tiny_dir, tmp_path, out=results, flags=RELEASE_FLAGS)
    rl.assert_no_problems(rl.check_exits([run]), [run])
    for phase, (trials, attrs) in before.items():  # no trial added or changed, records kept
        now, new_attrs = trials_of(url, phase)
        assert now == trials, phase
        assert_record_upgraded(attrs, new_attrs)
    assert run.summary["final"]["params"] == recorded["params"]
    assert run.summary["final"]["test_acc"] == [s["test_acc"] for s in recorded["seeds"]]
    after = files_of(results)
    assert {k: after.get(k) for k in kept} == kept, "a file of 0.1.0's results changed"
    assert set(after) - set(kept) == {"dashboard.html"}, set(after) - set(kept)

    final = clr_search(tmp_path, "final", "--storage", url, "--campaign", CAMPAIGN,
                       "--data-dir", cifar_tiny_dir.batches, "--n-val", 20, "--out",
                       results / "final", "--seeds", N_SEEDS, "--m", 2, "--n-s", 20,
                       "--cycles", 1)
    assert final["params"] == recorded["params"]
    assert final["test_acc"] == [s["test_acc"] for s in recorded["seeds"]]  # read, not retrained
    assert trials_of(url, "final")[0] == before["final"][0]
    assert files_of(results) == after

    page = tmp_path / "page.html"
    shown = clr_search(tmp_path, "dashboard", "--storage", url, "--campaign", CAMPAIGN, "--out",
                       page, "--final-dir", results / "final")
    assert shown["final"] is True and set(shown["studies"]) == {
        f"{CAMPAIGN}-{p}" for p in ("coarse", "fine", "confirm")}, shown
    assert page.stat().st_size > 0

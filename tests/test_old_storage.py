"""Storages written by an earlier release (commit 03d5f40, tests/data/README.md) still resume: the
same pipeline command on a copy of them finishes the campaign without rerunning what was done.

- old-complete.db, a finished campaign: no search or confirm trial is added or changed, the
  verdict is the recorded one, and the final run (its results folder is not kept with the
  fixture, so it is trained again) records one trial per seed of the recorded pick.
- old-fine-interrupted.db, killed during the fine phase's second trial: coarse is untouched,
  fine keeps its recorded range and its first trial and completes to its n_trials (the killed
  trial failed, not left RUNNING, and retried once with its λ), then confirm and the final run
  follow.

Both end with every runnerlib check of a campaign one runner ran. The tiny CIFAR-10 of the
conftest fixture is the data the fixtures were made on (each phase pins the data's fingerprint:
other data would be refused).
"""
import shutil

import pytest

import faultlib as fl
import runnerlib as rl
from old_storage import (CAMPAIGN, COMPLETE_DB, INTERRUPTED_DB, N_COARSE, N_FINE, N_SEEDS,
                         pipeline_command)

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
    url = fl.sqlite_url(db)
    before = {p: trials_of(url, p) for p in rl.campaign_study_names_phases(url, CAMPAIGN)}
    runner = rl.start_pipeline(pipeline_command(url, cifar_tiny_dir.batches, tmp_path / "out")[2:],
                               rl.env_for(tmp_path), tmp_path / "logs", "resumed")
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

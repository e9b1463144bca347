"""search.final: the final seeds, serial or in processes sharing a number of CPUs."""
import dataclasses
import os
import time

import numpy as np
import pytest

from model.train import TrainConfig, evaluate_ensemble, fit
from search import final
from search.final import _shared_cpus, run_seeds

CONFIG = TrainConfig(m=8, n_batch=10, n_s=6, cycles=1, evals_per_cycle=2, eval_train_samples=0,
                     lam=0.01, dtype="float64")


def test_parallel_seeds_equal_serial_seeds(tiny_data):
    """3 seeds on 2 workers (more seeds than workers: all at once, sharing 2 CPUs) give, seed for
    seed and in the order asked, the runs one process gives."""
    seeds = [4, 0, 2]
    serial = run_seeds(tiny_data, CONFIG, seeds, workers=1)
    parallel = run_seeds(tiny_data, CONFIG, seeds, workers=2)
    assert [r["seed"] for r in parallel] == seeds
    for a, b in zip(serial, parallel):
        for k in a["params"]:
            np.testing.assert_array_equal(a["params"][k], b["params"][k], err_msg=k)
        assert a["history"] == b["history"] and a["test"] == b["test"]
    # different seeds did train different networks
    assert not np.array_equal(serial[0]["params"]["W1"], serial[1]["params"]["W1"])


@pytest.mark.parametrize("workers", [1, 2])
def test_only_the_first_seed_records_a_train_curve(tiny_data, workers):
    """The figures draw the first seed's curves: the other seeds measure the train subset only at
    the end (their summary still has train metrics), and val at every point."""
    runs = run_seeds(tiny_data, CONFIG, [3, 1, 2], workers=workers)
    points = len(CONFIG.eval_steps())
    assert all(r["history"][i]["train"] is not None for r in runs[:1] for i in range(points))
    for r in runs[1:]:
        assert [h["train"] is None for h in r["history"]] == [True] * (points - 1) + [False]
    for r in runs:
        assert r["train"] == r["history"][-1]["train"] and "acc" in r["train"]
        assert all(h["val"] is not None for h in r["history"])


@pytest.mark.parametrize("seeds", [[0, 1, 2], [0, 1]])
def test_on_cpu_free_runs_once_while_the_last_seed_trains(tiny_data, tmp_path, monkeypatch, seeds):
    """With 2 workers the hook runs once, after the other seeds are done and while seed 0 still
    trains: seed 0 is made to finish only once the hook has run (it fails after 30 s without)."""
    hook_ran = tmp_path / "hook_ran"
    run_seed = final._run_seed  # the forked seed processes inherit the patched one

    def gated(data, config, seed, train_curve=True, on_eval=None, checkpoints=None):
        run = run_seed(data, config, seed, train_curve, on_eval, checkpoints)
        if seed != 0:
            (tmp_path / f"done{seed}").touch()
            return run
        deadline = time.monotonic() + 30
        while not hook_ran.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("on_cpu_free did not run while the last seed trained")
            time.sleep(0.01)
        return run
    monkeypatch.setattr(final, "_run_seed", gated)
    calls = []

    def hook():
        calls.append(sorted(p.name for p in tmp_path.glob("done*")))
        hook_ran.touch()
    runs = run_seeds(tiny_data, CONFIG, seeds, workers=2, on_cpu_free=hook)
    assert calls == [[f"done{s}" for s in seeds[1:]]]
    assert [r["seed"] for r in runs] == seeds


def test_a_failing_on_cpu_free_costs_no_seed(tiny_data, caplog):
    def hook():
        raise RuntimeError("no dashboard today")
    runs = run_seeds(tiny_data, CONFIG, [0, 1, 2], workers=2, on_cpu_free=hook)
    serial = run_seeds(tiny_data, CONFIG, [0, 1, 2], workers=1)
    assert [r["test"] for r in runs] == [r["test"] for r in serial]
    assert "no dashboard today" in caplog.text


def test_on_cpu_free_is_not_called_for_serial_seeds(tiny_data):
    calls = []
    run_seeds(tiny_data, CONFIG, [0, 1], workers=1, on_cpu_free=lambda: calls.append(1))
    assert calls == []


def test_shared_cpus_are_a_subset_of_the_allowed_ones():
    allowed = os.sched_getaffinity(0)
    for workers in range(1, len(allowed)):
        share = _shared_cpus(workers)
        assert len(share) == workers and share <= allowed
    assert _shared_cpus(len(allowed)) is None  # no confinement when the workers fill the machine


def test_a_failing_seed_is_raised_in_the_parent(tiny_data):
    # the decay 1 − 2ηλ is below −19 from the first step: float32 overflows within a few
    bad = TrainConfig(m=8, n_batch=10, n_s=6, cycles=1, evals_per_cycle=2, lam=1e6,
                      eta_max=10.0, dtype="float32")
    with pytest.raises(Exception, match="diverged"):
        run_seeds(tiny_data, bad, [0, 1, 2], workers=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reports_the_updates_of_every_seed(tiny_data, workers):
    seen = []
    run_seeds(tiny_data, CONFIG, [0, 1], workers=workers, progress=seen.append)
    total = 2 * CONFIG.total_steps
    assert seen and seen == sorted(seen) and all(0 <= n <= total for n in seen)
    assert seen[-1] == total  # the last report: every update of both seeds


def test_the_final_run_is_an_optuna_study_with_artifacts(tiny_data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import optuna
    from optuna.artifacts import get_all_artifact_meta

    from search.final import record_final_study, run_final
    from search.study import open_storage

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url)
    metrics, runs = run_final(tiny_data, CONFIG, [0, 1], CONFIG.lam, {"study": None},
                              tmp_path / "final")
    study = record_final_study(storage, "c", {"lam": CONFIG.lam}, CONFIG, runs,
                               tmp_path / "final", tmp_path / "artifacts")
    trials = study.get_trials()
    assert [t.user_attrs["seed"] for t in trials] == [0, 1]
    assert [t.value for t in trials] == [r["test"]["acc"] for r in runs]
    assert study.metric_names == ["test_acc"] and study.user_attrs["pick"] == {"lam": CONFIG.lam}
    names = {m.filename for m in get_all_artifact_meta(trials[0], storage=storage)}
    assert {"params_seed0.npz", "history_seed0.json", "accuracy.png"} <= names
    assert {m.filename for m in get_all_artifact_meta(trials[1], storage=storage)} == {
        "params_seed1.npz", "history_seed1.json"}
    # Optuna's own CLI lists the seeds
    optuna_cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(optuna_cli), "trials", "--study-name", "c-final", "--storage", url,
                           "-f", "json"], capture_output=True, text=True, check=True)
    import json
    assert [t["value"]["test_acc"] for t in json.loads(proc.stdout)] == [r["test"]["acc"] for r in runs]
    # a re-run of the same pick replaces the study: still one trial per seed
    study = record_final_study(storage, "c", {"lam": CONFIG.lam}, CONFIG, runs,
                               tmp_path / "final", tmp_path / "artifacts")
    assert len(study.get_trials()) == 2
    assert "c-final" in optuna.get_all_study_names(storage)


def test_a_final_run_of_another_pick_is_refused_unless_forced(tiny_data, tmp_path):
    import optuna

    from model.errors import InputError
    from search.final import check_final_study, record_final_study, run_final
    from search.study import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    _, runs = run_final(tiny_data, CONFIG, [0], CONFIG.lam, {"study": None}, tmp_path / "final")
    record_final_study(storage, "c", {"lam": 0.01}, CONFIG, runs, tmp_path / "final",
                       tmp_path / "artifacts")
    check_final_study(storage, "c", {"lam": 0.01})  # the same pick: fine
    with pytest.raises(InputError, match="--force-final"):
        check_final_study(storage, "c", {"lam": 0.02})
    assert "c-final" in optuna.get_all_study_names(storage)
    check_final_study(storage, "c", {"lam": 0.02}, force=True)
    assert "c-final" not in optuna.get_all_study_names(storage)


def test_final_metrics_report_the_snapshot_ensemble(tiny_data):
    """Each seed's test accuracy of its snapshot ensemble (one member per cycle end, the last
    being the final params) beside the last model's, and their mean over the seeds."""
    config = dataclasses.replace(CONFIG, cycles=3)
    runs = run_seeds(tiny_data, config, [0, 5], workers=1)
    metrics = final.final_metrics(runs, {"lam": config.lam}, {"study": None})
    for r, m in zip(runs, metrics["seeds"]):
        _, _, snapshots = fit(tiny_data, dataclasses.replace(config, seed=r["seed"]),
                              snapshots=True)
        expected = evaluate_ensemble(snapshots, tiny_data.test.X, tiny_data.test.y)
        assert r["test_ensemble"] == expected and expected["members"] == 3
        assert m["test_acc_ensemble"] == expected["acc"]
    assert metrics["test_acc_ensemble_mean"] == pytest.approx(
        np.mean([m["test_acc_ensemble"] for m in metrics["seeds"]]))


class _Killed(Exception):
    pass


def _kill_after_first_cycle(record):
    if record["step"] > 2 * LONG.n_s:
        raise _Killed


LONG = dataclasses.replace(CONFIG, cycles=3)


@pytest.mark.parametrize("workers", [1, 2])
def test_seeds_killed_mid_run_resume_from_their_checkpoints(tiny_data, tmp_path, workers):
    """A seed whose earlier run was killed after its first cycle resumes from <folder>/seed<k>.npz
    to the results of an uninterrupted run, and its checkpoint is gone once it finished."""
    folder = tmp_path / "final.checkpoints"
    with pytest.raises(_Killed):
        fit(tiny_data, dataclasses.replace(LONG, seed=1), on_eval=_kill_after_first_cycle,
            train_curve=False, snapshots=True, checkpoint=folder / "seed1.npz")
    resumed = run_seeds(tiny_data, LONG, [0, 1], workers=workers, checkpoints=folder)
    straight = run_seeds(tiny_data, LONG, [0, 1], workers=workers)
    for a, b in zip(resumed, straight):
        for k in a["params"]:
            np.testing.assert_array_equal(a["params"][k], b["params"][k], err_msg=k)
        assert a["history"] == b["history"] and a["test_ensemble"] == b["test_ensemble"]
    assert not list(folder.glob("*.npz"))

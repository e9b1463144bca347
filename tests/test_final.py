"""search.final: the final run's seeds, queued trials of the study <campaign>-final, trained in
one process or in processes sharing a number of CPUs."""
import dataclasses
import os
import time

import numpy as np
import optuna
import pytest

from clr_lambda_search.model.checkpoint import load_params
from clr_lambda_search.model.train import TrainConfig, evaluate_ensemble, fit
from clr_lambda_search.search import final, record
from clr_lambda_search.search.campaign import Campaign
from clr_lambda_search.search.core import run_context
from clr_lambda_search.search.final import FinalRun, read_final
from clr_lambda_search.search.phases import SearchPhase
from clr_lambda_search.search.space import Float
from clr_lambda_search.search.workers import PhaseStopped, _cpu_set

CONFIG = TrainConfig(m=8, n_batch=10, n_s=6, cycles=1, evals_per_cycle=2, eval_train_samples=0,
                     lam=0.01, dtype="float64")


def final_campaign(config=CONFIG, seeds=3):
    """A campaign whose final run trains config (its λ is the pick) for `seeds` seeds."""
    return Campaign(name="c", phases=(SearchPhase(name="coarse", n_trials=1, pruner="none",
                                                  space=(Float("lam", 1e-4, 1.0, log=True),)),),
                    config=tuple(vars(config).items()),
                    final=FinalRun(seeds=seeds, n_s=config.n_s))


def run_seeds(tmp_path, data, config=CONFIG, seeds=3, first_seed=0, workers=1, folder="run",
              pick=None, force=False, **kw):
    """The final run of pick (default config's λ) in the storage tmp_path/folder/s.db, results
    in tmp_path/folder/final: (metrics, the final study, the results folder)."""
    base = tmp_path / folder
    base.mkdir(parents=True, exist_ok=True)
    c = final_campaign(config, seeds)
    run = run_context(c, data, f"sqlite:///{base / 's.db'}", workers=workers,
                      progress=kw.pop("progress", None))
    out = base / "final"
    metrics = c.final.run(run, pick or {"lam": config.lam}, {"study": None}, out,
                          first_seed=first_seed, force=force, **kw)
    return metrics, optuna.load_study(study_name="c-final", storage=run.storage), out


def seed_runs(metrics, out):
    """Per seed, in the order the run lists them: (seed, params, history, test acc, test loss)
    from the results folder."""
    shown = read_final(out)
    return [(m["seed"], load_params(out / f"params_seed{m['seed']}.npz"),
             shown["histories"][m["seed"]], m["test_acc"], m["test_loss"])
            for m in metrics["seeds"]]


def test_parallel_seeds_equal_serial_seeds(tiny_data, tmp_path):
    """3 seeds on 2 workers (more seeds than workers: all at once, sharing 2 CPUs) give, seed for
    seed and in the order of the run's seeds, the runs one process gives."""
    serial = seed_runs(*_metrics_out(run_seeds(tmp_path, tiny_data, first_seed=4, workers=1,
                                               folder="serial")))
    parallel = seed_runs(*_metrics_out(run_seeds(tmp_path, tiny_data, first_seed=4, workers=2,
                                                 folder="parallel")))
    assert [r[0] for r in parallel] == [r[0] for r in serial] == [4, 5, 6]
    for a, b in zip(serial, parallel):
        for k in a[1]:
            np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)
        assert a[2] == b[2] and a[3:] == b[3:]
    # different seeds did train different networks
    assert not np.array_equal(serial[0][1]["W1"], serial[1][1]["W1"])


def _metrics_out(result):
    metrics, _, out = result
    return metrics, out


@pytest.mark.parametrize("workers", [1, 2])
def test_only_the_first_seed_records_a_train_curve(tiny_data, tmp_path, workers):
    """The figures draw the first seed's curves: the other seeds measure the train subset only at
    the end (their summary still has train metrics), and val at every point."""
    metrics, study, out = run_seeds(tmp_path, tiny_data, first_seed=1, workers=workers)
    histories = read_final(out)["histories"]
    assert sorted(histories) == [1, 2, 3]
    points = len(CONFIG.eval_steps())
    assert all(histories[1][i]["train"] is not None for i in range(points))
    for seed in (2, 3):
        assert [h["train"] is None for h in histories[seed]] == [True] * (points - 1) + [False]
    for m in metrics["seeds"]:
        history = histories[m["seed"]]
        assert m["train_acc"] == history[-1]["train"]["acc"]
        assert all(h["val"] is not None for h in history)
    # the trials hold the same histories; with 2 workers one may also have made a surplus trial
    # (it asked when the last queued seed had just been claimed), failed untrained as such
    trained = [t for t in study.trials if not record.is_bookkeeping(t)]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trained)
    assert {t.user_attrs["seed"]: t.user_attrs["history"] for t in trained} == histories


@pytest.mark.parametrize("seeds", [3, 2])
def test_on_cpu_free_runs_once_while_the_last_seed_trains(tiny_data, tmp_path, monkeypatch, seeds):
    """With 2 workers the hook runs once, after the other seeds are done and while seed 0 still
    trains: seed 0 is made to finish only once the hook has run (it fails after 30 s without)."""
    hook_ran = tmp_path / "hook_ran"
    train_seed = final.train_seed  # the forked workers inherit the patched one

    def gated(data, config, train_curve=True, on_eval=None, checkpoint=None):
        run = train_seed(data, config, train_curve, on_eval, checkpoint)
        if config.seed != 0:
            (tmp_path / f"done{config.seed}").touch()
            return run
        deadline = time.monotonic() + 30
        while not hook_ran.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("on_cpu_free did not run while the last seed trained")
            time.sleep(0.01)
        return run
    monkeypatch.setattr(final, "train_seed", gated)
    calls = []

    def hook():
        calls.append(sorted(p.name for p in tmp_path.glob("done*")))
        hook_ran.touch()
    metrics, _, _ = run_seeds(tmp_path, tiny_data, seeds=seeds, workers=2, on_cpu_free=hook)
    assert calls == [[f"done{s}" for s in range(1, seeds)]]
    assert [m["seed"] for m in metrics["seeds"]] == list(range(seeds))


def test_a_failing_on_cpu_free_costs_no_seed(tiny_data, tmp_path, caplog):
    def hook():
        raise RuntimeError("no dashboard today")
    runs, _, _ = run_seeds(tmp_path, tiny_data, workers=2, on_cpu_free=hook, folder="hooked")
    serial, _, _ = run_seeds(tmp_path, tiny_data, workers=1, folder="serial")
    assert [(m["seed"], m["test_acc"]) for m in runs["seeds"]] == \
        [(m["seed"], m["test_acc"]) for m in serial["seeds"]]
    assert "no dashboard today" in caplog.text


def test_on_cpu_free_is_not_called_for_serial_seeds(tiny_data, tmp_path):
    calls = []
    run_seeds(tmp_path, tiny_data, seeds=2, workers=1, on_cpu_free=lambda: calls.append(1))
    assert calls == []


def test_shared_cpus_are_a_subset_of_the_allowed_ones():
    allowed = os.sched_getaffinity(0)
    for workers in range(1, len(allowed)):
        share = _cpu_set(workers)
        assert len(share) == workers and share <= allowed
    assert _cpu_set(len(allowed)) is None  # no confinement when the workers fill the machine


def test_a_failing_seed_is_raised_in_the_parent(tiny_data, tmp_path):
    # the decay 1 − 2ηλ is below −19 from the first step: float32 overflows within a few
    bad = TrainConfig(m=8, n_batch=10, n_s=6, cycles=1, evals_per_cycle=2, lam=1e6,
                      eta_max=10.0, dtype="float32")
    with pytest.raises(PhaseStopped, match="diverged"):
        run_seeds(tmp_path, tiny_data, config=bad, workers=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reports_the_seeds_done(tiny_data, tmp_path, workers):
    """The final run reports its progress in seeds done (it reported updates before the final
    run became queued trials)."""
    seen = []
    run_seeds(tmp_path, tiny_data, seeds=2, workers=workers,
              progress=lambda name, done, total, unit: seen.append((name, done, total)))
    dones = [d for _, d, _ in seen]
    assert seen and dones == sorted(dones) and all(0 <= d <= 2 for d in dones)
    assert seen[-1] == ("c-final", 2, 2)  # the last report: both seeds


def test_the_final_run_is_an_optuna_study_with_artifacts(tiny_data, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from optuna.artifacts import get_all_artifact_meta


    metrics, study, _ = run_seeds(tmp_path, tiny_data, seeds=2)
    storage = study._storage
    url = f"sqlite:///{tmp_path / 'run' / 's.db'}"
    trials = study.get_trials()
    assert [t.user_attrs["seed"] for t in trials] == [0, 1]
    assert [t.value for t in trials] == [m["test_acc"] for m in metrics["seeds"]]
    assert study.metric_names == ["test_acc"]
    assert record.read(study).pick == {"lam": CONFIG.lam}
    names = {m.filename for m in get_all_artifact_meta(trials[0], storage=storage)}
    assert {"params_seed0.npz", "history_seed0.json"} <= names
    assert {m.filename for m in get_all_artifact_meta(trials[1], storage=storage)} == {
        "params_seed1.npz", "history_seed1.json"}
    # the figures are the study's (a finished trial takes no artifact; they were the first
    # seed's trial's before the final run became queued trials)
    assert "accuracy.png" in {m.filename for m in get_all_artifact_meta(study)}
    # Optuna's own CLI lists the seeds
    optuna_cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(optuna_cli), "trials", "--study-name", "c-final", "--storage", url,
                           "-f", "json"], capture_output=True, text=True, check=True)
    assert [t["value"]["test_acc"] for t in json.loads(proc.stdout)] == \
        [m["test_acc"] for m in metrics["seeds"]]
    # a re-run of the same pick resumes the study: still one trial per seed, none trained again
    _, again, _ = run_seeds(tmp_path, tiny_data, seeds=2)
    assert [(t.number, t.value) for t in again.get_trials()] == \
        [(t.number, t.value) for t in trials]
    assert "c-final" in optuna.get_all_study_names(storage)


def test_final_trials_carry_their_params_and_training_time(tiny_data, tmp_path, monkeypatch):
    """Optuna's views of the final study tell the truth: each trial's params are what it
    trained (the pick and its seed, with distributions), and its duration spans its training
    (the trial is claimed, then trained: not a bookkeeping moment after the fact). The
    figures' titles name the pick and the seed drawn."""
    from clr_lambda_search.model import curves

    titles = []
    drawn = curves.training_figures
    monkeypatch.setattr(curves, "training_figures",
                        lambda h, c, suffix="": titles.append(suffix) or drawn(h, c, suffix))
    config = dataclasses.replace(CONFIG, n_s=6000)  # long enough to measure (0.1-0.4 s)
    _, study, _ = run_seeds(tmp_path, tiny_data, config=config, seeds=2, first_seed=5)
    assert titles == ["lam=0.01, seed 5"]
    for seed, t in zip((5, 6), study.get_trials()):
        assert t.params == {"lam": config.lam, "seed": seed}
        assert t.distributions["seed"] == optuna.distributions.CategoricalDistribution([5, 6])
        duration = (t.datetime_complete - t.datetime_start).total_seconds()
        # (seconds are rounded to 0.01; a trial told after its training would last ~0.001 s)
        assert t.user_attrs["seconds"] >= 0.05 and duration >= t.user_attrs["seconds"] - 0.01


def test_a_final_run_of_another_pick_is_refused_unless_forced(tiny_data, tmp_path):
    from clr_lambda_search.model.errors import InputError

    _, study, out = run_seeds(tmp_path, tiny_data, seeds=1, pick={"lam": 0.01})
    storage = study._storage
    run_seeds(tmp_path, tiny_data, seeds=1, pick={"lam": 0.01})  # the same pick: fine
    with pytest.raises(InputError, match="--force-final"):
        run_seeds(tmp_path, tiny_data, seeds=1, pick={"lam": 0.02})
    assert [s.study_name for s in final.final_versions(storage, "c")] == ["c-final"]
    # forced: the new pick trains as version 2; once complete it is the campaign's final run
    # and version 1 is kept, retired, with its trial and artifacts
    metrics, _, _ = run_seeds(tmp_path, tiny_data, seeds=1, pick={"lam": 0.02}, force=True)
    assert [s.study_name for s in final.final_versions(storage, "c")] == ["c-final", "c-final.v2"]
    assert final.current_final(storage, "c").study_name == "c-final.v2"
    kept = optuna.load_study(study_name="c-final", storage=storage)
    assert record.read(kept).pick == {"lam": 0.01} and record.read(kept).retired
    assert len(kept.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 1
    assert metrics["params"] == {"lam": 0.02} and metrics["final_study"] == "c-final.v2"
    assert read_final(out)["metrics"] == metrics


def _fail_seed(seed, monkeypatch):
    """Make the final run's training of `seed` fail (in this process and forked workers)."""
    train_seed = final.train_seed

    def failing(data, config, *args, **kw):
        if config.seed == seed:
            raise RuntimeError(f"seed {seed} broke")
        return train_seed(data, config, *args, **kw)
    monkeypatch.setattr(final, "train_seed", failing)


def _folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", ["pick", "settings"])
def test_a_failed_new_final_run_leaves_the_old_record_as_it_was(tiny_data, tmp_path, monkeypatch,
                                                                  change):
    """A final run that replaces another (another pick with force, or other settings of the same
    pick) and fails after some of its seeds trained leaves the previous final study, its
    artifacts and the results folder as they were; run again, it resumes (the seeds it trained
    are not trained again) and replaces them only once complete."""
    _, study, out = run_seeds(tmp_path, tiny_data, seeds=2, pick={"lam": 0.01})
    storage = study._storage
    before_folder = _folder_bytes(out)
    before_artifacts = _folder_bytes(final.artifact_dir(out))
    new = ({"pick": {"lam": 0.02}, "force": True} if change == "pick"
           else {"config": dataclasses.replace(CONFIG, n_s=CONFIG.n_s + 10)})
    _fail_seed(1, monkeypatch)
    with pytest.raises((PhaseStopped, RuntimeError), match="seed 1 broke"):
        run_seeds(tmp_path, tiny_data, seeds=2, **new)
    current = final.current_final(storage, "c")
    assert current.study_name == "c-final" and not record.read(current).retired
    assert record.read(current).pick == {"lam": 0.01}
    assert _folder_bytes(out) == before_folder
    assert _folder_bytes(final.artifact_dir(out)).items() >= before_artifacts.items()
    assert read_final(out)["metrics"]["final_study"] == "c-final"
    # the same command again, fixed: seed 0 of version 2 is not trained again
    monkeypatch.undo()
    trained = []
    train_seed = final.train_seed
    monkeypatch.setattr(final, "train_seed",
                        lambda data, config, *a, **kw: trained.append(config.seed)
                        or train_seed(data, config, *a, **kw))
    metrics, _, _ = run_seeds(tmp_path, tiny_data, seeds=2, **new)
    assert trained == [1]
    assert final.current_final(storage, "c").study_name == "c-final.v2"
    assert record.read(optuna.load_study(study_name="c-final", storage=storage)).retired
    assert read_final(out)["metrics"] == metrics and metrics["final_study"] == "c-final.v2"
    # the results folder shows the new run's seeds (the same trial numbers as version 1's)
    assert metrics["trials"] == read_final(out)["metrics"]["trials"]
    assert _folder_bytes(out) != before_folder


def test_final_metrics_report_the_snapshot_ensemble(tiny_data):
    """Each seed's test accuracy of its snapshot ensemble (one member per cycle end, the last
    being the final params) beside the last model's, and their mean over the seeds."""
    config = dataclasses.replace(CONFIG, cycles=3)
    runs = [final.train_seed(tiny_data, dataclasses.replace(config, seed=s)) for s in (0, 5)]
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


def test_seeds_killed_mid_run_resume_from_their_checkpoints(tiny_data, tmp_path, monkeypatch):
    """A seed whose earlier run was killed after its first cycle resumes from
    <results folder>.checkpoints/seed<k>.npz to the results of an uninterrupted run, and the
    checkpoints are gone once the run finished."""
    folder = tmp_path / "run" / "final.checkpoints"
    with pytest.raises(_Killed):
        fit(tiny_data, dataclasses.replace(LONG, seed=1), on_eval=_kill_after_first_cycle,
            train_curve=False, snapshots=True, checkpoint=folder / "seed1.npz")
    assert (folder / "seed1.npz").is_file()
    # the seed really resumed: its first evaluation is the one after its checkpoint at the end
    # of cycle 1 (2·n_s; evaluations every n_s), where a fresh start evaluates step 0
    spy = _first_steps(monkeypatch)
    resumed, _, out = run_seeds(tmp_path, tiny_data, LONG, seeds=2, workers=1)
    assert spy == {0: 0, 1: 3 * LONG.n_s}
    monkeypatch.undo()
    straight, _, out2 = run_seeds(tmp_path, tiny_data, LONG, seeds=2, workers=2,
                                  folder="straight")
    for a, b in zip(seed_runs(resumed, out), seed_runs(straight, out2)):
        assert a[0] == b[0] and a[2] == b[2] and a[3:] == b[3:]
        for k in a[1]:
            np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)
    assert not folder.exists()


def _first_steps(monkeypatch):
    """{seed: the first step its training evaluates after it starts or resumes}, filled as
    search.final.train_seed runs (in this process)."""
    seen = {}
    real = final.fit

    def spying_fit(data, config, on_eval=None, **kwargs):
        def first(rec):
            seen.setdefault(config.seed, rec["step"])
            if on_eval:
                on_eval(rec)
        return real(data, config, on_eval=first, **kwargs)
    monkeypatch.setattr(final, "fit", spying_fit)
    return seen

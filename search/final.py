"""The final run: train the chosen parameters with the final protocol for several seeds, test once
each."""
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from queue import Empty

import numpy as np
import optuna

from model.checkpoint import load_json, save_run
from model.errors import InputError
from model.outputs import publish_dir
from model.train import evaluate, evaluate_ensemble, fit, warm_up
from search.processes import die_with_parent, exit_code, stop_processes
from search.study import study_name

log = logging.getLogger(__name__)


def run_seeds(data, config, seeds, workers=1, on_cpu_free=None, progress=None, checkpoints=None):
    """Train config once per seed; evaluate the test set once, at the end of each run.

    With workers > 1 every seed runs at once in a forked process (sharing the data, one BLAS
    thread each); when there are more seeds than workers, the processes are confined to `workers`
    CPUs and share them, so that 3 seeds on 2 workers finish together in 1.5 run times instead of
    a third seed training alone for a whole run while a core idles.
    Only the first seed's history has train metrics at every evaluation point: its curves are the
    ones drawn (model.checkpoint.save_run); the others measure the train subset at the end only
    (on the final protocol's 10,000 images that saves a fifth of their time) and val throughout.
    on_cpu_free: optional callable run once, in this process, as soon as fewer seeds train than
      there are workers while one still does: the first seed's curves make it the last to finish,
      alone on one CPU for ~1.5 s, and the caller's own work (the pipeline's dashboard) uses the
      other one then. Not called when the seeds run serially. Its failure costs no seed: it is
      logged as a warning and the seeds go on (the pipeline makes its dashboard again later, and
      fails there if it must).
    progress: optional callable(updates done, summed over the seeds), called in this process at
      every evaluation point of a serial seed, and about once a second while forked seeds train.
    checkpoints: None, or a folder where each seed's training state is saved at its cycle ends
      (seed<k>.npz, model.train.fit) and resumed from by a re-run; removed once the seed finished.
    Returns a list of {seed, params, history, train, val, test, seconds} in the order of seeds.
    """
    if workers <= 1 or len(seeds) == 1:
        return [_run_seed(data, config, seed, seed == seeds[0],
                          _progress_from(progress, k * config.total_steps), checkpoints)
                for k, seed in enumerate(seeds)]
    warm_up(data, config)  # compiled once, inherited by every seed's process
    ctx = multiprocessing.get_context("fork")
    cpus = _shared_cpus(workers) if len(seeds) > workers else None
    queue = ctx.Queue()
    steps = ctx.Array("q", len(seeds), lock=False)  # each seed's last evaluated update
    procs = [ctx.Process(target=_seed_worker, name=f"seed-{seed}",
                         args=(data, config, seed, seed == seeds[0], queue, cpus, os.getpid(),
                               (steps, k), checkpoints))
             for k, seed in enumerate(seeds)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:  # read before join: a child blocks until its result is taken
            run = _next_result(queue, progress, steps)
            if isinstance(run, BaseException):
                raise run
            results[run["seed"]] = run
            if on_cpu_free and len(procs) - len(results) < workers:
                _side_work(on_cpu_free)
                on_cpu_free = None
    except BaseException:  # a seed failed, Ctrl-C or SIGTERM: no seed trains on, none waits
        stop_processes(procs, signal.SIGTERM)
        raise
    for p in procs:
        p.join()
    if progress:
        progress(sum(steps))
    return [results[seed] for seed in seeds]


def _next_result(queue, progress, steps):
    """The next result a seed process sends; progress(sum of steps) about once a second meanwhile."""
    if progress is None:
        return queue.get()
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            progress(sum(steps))


def _progress_from(progress, offset):
    """An on_eval callback reporting offset + the record's step to progress (None: no callback)."""
    if progress is None:
        return None
    return lambda record: progress(offset + record["step"])


def _side_work(fn):
    try:
        fn()
    except Exception as e:
        log.warning("work done beside the last seed failed (%s: %s); the seeds go on",
                    type(e).__name__, e)


def _shared_cpus(workers):
    """The first `workers` CPUs this process may run on; None when the workers fill them anyway
    or where affinity is not available (the seeds then share the whole machine)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[:workers]) if len(allowed) > workers else None


def _seed_worker(data, config, seed, train_curve, queue, cpus, parent_pid, step_slot,
                 checkpoints=None):
    from threadpoolctl import threadpool_limits

    try:
        die_with_parent(parent_pid)
        if cpus:
            os.sched_setaffinity(0, cpus)
        with threadpool_limits(limits=1, user_api="blas"):
            steps, k = step_slot
            queue.put(_run_seed(data, config, seed, train_curve,
                                lambda record: steps.__setitem__(k, record["step"]), checkpoints))
        queue.close()
        queue.join_thread()  # here, not at exit: a SIGTERM while the result is sent is caught below
    except KeyboardInterrupt as e:  # stopped by the parent, or orphaned: nobody reads a result
        os._exit(exit_code(e))
    except BaseException as e:  # the parent re-raises it
        queue.put(e)


def _run_seed(data, config, seed, train_curve=True, on_eval=None, checkpoints=None):
    cfg = dataclasses.replace(config, seed=seed)
    start = time.perf_counter()
    state = Path(checkpoints) / f"seed{seed}.npz" if checkpoints else None
    params, history, snapshots = fit(data, cfg, on_eval=on_eval, train_curve=train_curve,
                                     snapshots=True, checkpoint=state)
    test = evaluate(params, data.test.X, data.test.y, cfg.lam)
    # the snapshot ensemble of the cycle ends (the last one is params): one test pass per cycle
    ensemble = evaluate_ensemble(snapshots, data.test.X, data.test.y)
    log.info("final seed %d: val acc %.4f, test acc %.4f (snapshot ensemble of %d: %.4f)", seed,
             history[-1]["val"]["acc"], test["acc"], len(snapshots), ensemble["acc"])
    if state:
        state.unlink(missing_ok=True)  # the seed's results are in hand
    return {"seed": seed, "params": params, "history": history, "train": history[-1]["train"],
            "val": history[-1]["val"], "test": test, "test_ensemble": ensemble,
            "seconds": round(time.perf_counter() - start, 2)}


def final_metrics(runs, params, source):
    """metrics.json: the chosen parameters and where they came from, per-seed accuracies, test
    mean ± std, and the test accuracy of each seed's snapshot ensemble (one member per cycle)
    and their mean. (config.json holds the whole TrainConfig that was trained.)"""
    test = [r["test"]["acc"] for r in runs]
    ensemble = [r["test_ensemble"]["acc"] for r in runs]
    return {
        "params": params, "source": source,
        "seeds": [{"seed": r["seed"], "train_acc": r["train"]["acc"], "val_acc": r["val"]["acc"],
                   "test_acc": r["test"]["acc"], "test_loss": r["test"]["loss"],
                   "test_acc_ensemble": r["test_ensemble"]["acc"],
                   "seconds": r["seconds"]} for r in runs],
        "val_acc_mean": float(np.mean([r["val"]["acc"] for r in runs])),
        "test_acc_mean": float(np.mean(test)), "test_acc_std": float(np.std(test)),
        "test_acc_ensemble_mean": float(np.mean(ensemble)),
        "seconds": round(sum(r["seconds"] for r in runs), 2),
    }


def run_final(data, config, seeds, params, source, out, storage=None, campaign=None, workers=1,
              on_cpu_free=None, protect=(), progress=None):
    """Train and test every seed, publish the results folder `out` (atomically; see
    model.outputs.publish_dir for `protect`), and, given a storage, record the run as the study
    <campaign>-final with its files as artifacts beside `out` (record_final_study).
    Returns (metrics, runs). on_cpu_free, progress: see run_seeds."""
    checkpoints = Path(f"{out}.checkpoints")  # seeds killed mid-run resume from here
    runs = run_seeds(data, config, seeds, workers, on_cpu_free, progress, checkpoints)
    shutil.rmtree(checkpoints, ignore_errors=True)
    metrics = final_metrics(runs, params, source)
    tagged = [(f"_seed{r['seed']}", r["params"], r["history"]) for r in runs]
    publish_dir(out, lambda folder: save_run(folder, config, metrics, tagged,
                                             {"data": data.source, "seeds": list(seeds)}),
                protect)
    if storage is not None:
        record_final_study(storage, campaign, params, config, runs, out, artifact_dir(out))
    return metrics, runs


def artifact_dir(out):
    """Where the final run's artifacts go: beside its results folder (studies/<campaign>/)."""
    return Path(out).parent / "artifacts"


def read_final(folder):
    """{"metrics", "config", "history" (of the first seed), "histories" (every seed's, by seed)}
    of a final results folder, or None."""
    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        return None
    metrics = load_json(folder / "metrics.json")
    histories = {s["seed"]: load_json(folder / f"history_seed{s['seed']}.json")
                 for s in metrics["seeds"] if (folder / f"history_seed{s['seed']}.json").is_file()}
    first = metrics["seeds"][0]["seed"]
    return {"metrics": metrics, "config": load_json(folder / "config.json"),
            "history": histories[first], "histories": histories}


def final_study_name(campaign):
    """The study that records a campaign's final run: no search ever reads it (test accuracy
    must not leak into a pick)."""
    return study_name(campaign, "final")


def check_final_study(storage, campaign, pick, force=False):
    """Before a final run: InputError when the campaign's recorded final run trained another pick
    (force: the old final study is deleted instead). pick: the searched parameters' values."""
    name = final_study_name(campaign)
    if name not in optuna.get_all_study_names(storage):
        return
    recorded = optuna.load_study(study_name=name, storage=storage).user_attrs.get("pick")
    if recorded is None or recorded == pick:
        return
    if not force:
        raise InputError(f"campaign {campaign!r} has a final run of {recorded}, and its pick is now "
                         f"{pick}; use a new --campaign to keep both, or --force-final to replace "
                         "the final run")
    log.warning("replacing the final run of %s (--force-final)", recorded)
    optuna.delete_study(study_name=name, storage=storage)


def record_final_study(storage, campaign, pick, config, runs, out, artifact_dir):
    """The final run as the Optuna study <campaign>-final: one COMPLETE trial per seed whose value
    is the test accuracy (attrs: validation accuracy and loss, steps, seconds, the config), with
    the seed's params, history and the figures of the results folder `out` attached as artifacts
    in a FileSystemArtifactStore at artifact_dir. A re-run of the same pick replaces it."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    name = final_study_name(campaign)
    if name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)  # same pick (check_final_study)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["test_acc"])
    for key, value in {"campaign": campaign, "phase": "final", "pick": pick,
                       "config": {**dataclasses.asdict(config), "seed": None}}.items():
        study.set_user_attr(key, value)
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    out = Path(out)
    for k, r in enumerate(runs):
        with warnings.catch_warnings():  # a recorded run, not a trial to heartbeat
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        for key, value in {"seed": r["seed"], "val_acc": r["val"]["acc"],
                           "val_loss": r["val"]["loss"], "test_loss": r["test"]["loss"],
                           "train_acc": r["train"]["acc"], "steps": config.total_steps,
                           "seconds": r["seconds"]}.items():
            trial.set_user_attr(key, value)
        files = [f"params_seed{r['seed']}.npz", f"history_seed{r['seed']}.json"]
        if k == 0:  # the figures are the first seed's
            files += sorted(p.name for ext in ("png", "svg") for p in out.glob(f"*.{ext}"))
        for file in files:  # artifacts attach to a running trial only
            if (out / file).is_file():
                upload_artifact(artifact_store=store, file_path=str(out / file),
                                study_or_trial=trial)
        study.tell(trial, r["test"]["acc"])
    return study

"""Running a phase: samplers and pruners, the worker loop, and local worker processes.

"Run to N" semantics: a phase is done when it holds N finished trials (COMPLETE or PRUNED), however
many runs, workers and crashes it took. A worker starts a trial only while finished + running trials
fall short of N; it waits while the missing trials are running elsewhere, and takes over a trial
whose worker died (its heartbeat stopped) once Optuna re-queues it with the same λ.
"""
import logging
import multiprocessing
import os
import signal
import time
import warnings

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from model.errors import ConfigError, DivergedError
from search.study import FINISHED, count_states, open_storage

log = logging.getLogger(__name__)

SAMPLERS = ("random", "tpe", "grid")
PRUNERS = ("none", "median", "hyperband")


SURPLUS = "surplus: other workers completed the phase"


def worker_seed(study_seed, worker_index, n_existing):
    """A sampler seed unique to (study seed, worker, trials already in the study).

    Resumed and parallel workers must not replay one λ sequence (optuna #3255); a fresh serial
    run stays reproducible.
    """
    return int(np.random.SeedSequence([study_seed, worker_index, n_existing]).generate_state(1)[0])


def make_sampler(kind, seed, grid=None):
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    if kind == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


class MarginMedianPruner(optuna.pruners.BasePruner):
    """Median pruning that tolerates the noise of the validation accuracy.

    A plain median rule prunes half of the trials whose λ are equally good, on noise alone (the
    accuracy of a 1,000-image validation set has a std of ~1.6 points). This one prunes a trial
    only when its value at a step is more than `margin` below the median of the completed trials'
    values at that step: it stops λ that are clearly too large, not the lucky draw's neighbours.
    """

    def __init__(self, margin=0.02, n_startup_trials=5, n_warmup_steps=0):
        self.margin = margin
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study, trial):
        step = trial.last_step
        if step is None or step <= self.n_warmup_steps:
            return False
        others = [t.intermediate_values[step] for t in
                  study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if step in t.intermediate_values]
        if len(others) < self.n_startup_trials:
            return False
        return trial.intermediate_values[step] < float(np.median(others)) - self.margin


def make_pruner(kind, config):
    """Pruners see the first seed's validation accuracy at every half cycle (step = update)."""
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        # the first half cycle ends at η_max, where accuracy is noisy: judge from the first cycle on
        return MarginMedianPruner(n_startup_trials=5, n_warmup_steps=config.n_s)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=config.n_s,
                                              max_resource=config.total_steps, reduction_factor=3)
    raise ConfigError(f"unknown pruner {kind!r}; choose one of {', '.join(PRUNERS)}")


def n_finished(study):
    counts = count_states(study)
    return sum(counts[s] for s in FINISHED)


def work(study, objective, target, poll=1.0, after_trial=None):
    """Run trials of study until it holds `target` finished trials (see the module docstring).

    after_trial: optional callable() run after each trial this worker ran (progress bars).
    """
    guarded = _guard_surplus(objective, target)
    while True:
        _fail_stale_trials(study)
        counts = count_states(study)
        done = sum(counts[s] for s in FINISHED)
        if done >= target:
            return done
        if done + counts[TrialState.RUNNING] >= target and counts[TrialState.WAITING] == 0:
            time.sleep(poll)  # the missing trials are running: wait for them, or for their death
            continue
        try:
            study.optimize(guarded, n_trials=1, catch=(DivergedError,),
                           gc_after_trial=False)
        except UpdateFinishedTrialError:
            # SQLite lets two workers take one queued trial; the other one finishes it.
            log.info("a queued trial was taken by another worker")
        if after_trial:
            after_trial()


def _guard_surplus(objective, target):
    def guarded(trial):
        before = [t for t in trial.study.get_trials(deepcopy=False)
                  if t.number < trial.number and (t.state in FINISHED or t.state == TrialState.RUNNING)]
        if len(before) >= target:
            # pruned, not failed: a race between workers is no error (and Optuna logs no traceback)
            trial.set_user_attr("failure", SURPLUS)
            raise optuna.TrialPruned(SURPLUS)
        return objective(trial)
    return guarded


def _fail_stale_trials(study):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_worker(storage_url, study_name, objective, target, make_sampler_for, pruner, worker_index,
               storage_opts=None, after_trial=None):
    """One worker: its own storage connection and sampler, then the work loop."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        storage = open_storage(storage_url, **(storage_opts or {}))
        n_existing = len(optuna.load_study(study_name=study_name, storage=storage).trials)
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  sampler=make_sampler_for(worker_index, n_existing), pruner=pruner)
        return work(study, objective, target, after_trial=after_trial)


def run_workers(n_workers, progress=None, **worker_kwargs):
    """Run n_workers workers: in this process for one, else as forked processes sharing the data.

    progress: optional callable() polled about once a second while forked workers run.
    Returns the exit codes of the forked workers ([] for one worker in-process).
    """
    if n_workers == 1:
        run_worker(worker_index=0, after_trial=progress, **worker_kwargs)
        return []
    ctx = multiprocessing.get_context("fork")  # the data loaded by the parent is shared, not copied
    procs = [ctx.Process(target=_worker_main, kwargs={**worker_kwargs, "worker_index": i},
                         name=f"worker-{i}") for i in range(n_workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if progress:
                progress()
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join()
        raise
    for p in procs:
        p.join()
    if progress:
        progress()
    return [p.exitcode for p in procs]


def _worker_main(**kwargs):
    try:
        run_worker(**kwargs)
    except KeyboardInterrupt:
        os._exit(130)

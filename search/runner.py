"""Running a phase: samplers and pruners, the worker loop, and local worker processes.

"Run to N" semantics: a phase is done when it holds N COMPLETE trials (for a grid: N values
tried, a diverged value included), however many runs, workers and crashes it took. A worker starts
a trial only while done + running trials fall short of N; it waits while the missing trials are
running elsewhere, and takes over a trial whose worker died (its heartbeat stopped, or it died
before its first heartbeat) once it is re-queued with the same λ.

Samplers draw from a random state seeded by (study seed, trial number) before every trial: the λ
of a trial does not depend on which worker or process runs it, parallel and resumed workers never
replay one λ sequence (optuna #3255), and a random phase is reproducible trial by trial.
"""
import datetime
import importlib.util
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import warnings

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
# no public module exports it; see _reseed
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import TrialState

from model.errors import ConfigError, DivergedError, InputError, Terminated, WorkersFailed
from model.train import warm_up
from search.processes import die_with_parent, exit_code, stop_processes
from search.study import (FINISHED, open_storage, retried_from, retry_chain,
                          storage_failure_kind, storage_failure_message)

log = logging.getLogger(__name__)

SURPLUS = "surplus: other workers completed the phase"
DUPLICATE_RETRY = "duplicate retry: an earlier trial re-runs the same dead trial"

# Short names of the samplers and pruners the scripts offer; any optuna.samplers / optuna.pruners
# class is nameable too, as {name = "TPESampler", multivariate = true} in a campaign file.
SAMPLERS = {"random": ("RandomSampler", {}), "tpe": ("TPESampler", {"n_startup_trials": 4}),
            "grid": ("GridSampler", {})}
PRUNERS = ("none", "median", "hyperband")
# Optional dependencies some of Optuna's samplers import only once they sample: checked up front.
_NEEDS = {"GPSampler": ("torch",), "CmaEsSampler": ("cmaes",)}


def trial_seed(study_seed, number):
    """The seed of trial `number`'s random draws."""
    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0])


def _reseed(sampler, seed):
    """Seed the random states of sampler and of the samplers it holds (TPE's startup sampler,
    CMA-ES's independent sampler, …). Optuna has no public API for it (reseed_rng draws a fresh
    random seed): we set their private LazyRandomState, which every optuna.samplers class keeps
    its draws in (tested for each class in tests/test_space.py)."""
    for value in vars(sampler).values():
        if isinstance(value, LazyRandomState):
            value.rng.seed(seed)
        elif isinstance(value, optuna.samplers.BaseSampler):
            _reseed(value, seed)


_SEEDED_CLASSES = {}


def _seeded_class(cls):
    """cls with a before_trial that first reseeds from (study seed, trial number). A direct
    subclass: Python lets an object's class be swapped only for one with the same layout."""
    if cls not in _SEEDED_CLASSES:
        def before_trial(self, study, trial):
            _reseed(self, trial_seed(self.study_seed, trial.number))
            cls.before_trial(self, study, trial)
        _SEEDED_CLASSES[cls] = type(f"TrialSeeded{cls.__name__}", (cls,),
                                    {"before_trial": before_trial, "trial_seeded": True})
    return _SEEDED_CLASSES[cls]


def trial_seeded(sampler, study_seed):
    """The sampler, its draws now seeded from (study_seed, trial number) before every trial.

    Works for any sampler object, a user's included: its class is swapped for a subclass that
    adds the reseeding (isinstance checks and the object's state are kept)."""
    if not getattr(sampler, "trial_seeded", False):
        sampler.__class__ = _seeded_class(type(sampler))
    sampler.study_seed = study_seed
    return sampler


def split_spec(spec, what):
    """(name, kwargs) of a sampler or pruner given as a name or as {name = …, **kwargs}."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        kwargs = dict(spec)
        return kwargs.pop("name"), kwargs
    raise ConfigError(f"a {what} is a name or a table with a name, e.g. {{name = \"TPESampler\", "
                      f"multivariate = true}} (got {spec!r})")


def _build(cls, kwargs, what):
    try:
        with warnings.catch_warnings():  # chosen in a campaign: Optuna's notice would repeat in
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # every worker
            return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} {cls.__name__}: bad arguments ({e}); see optuna's "
                          f"documentation of {cls.__name__}") from None


def make_sampler(spec, seed, grid=None):
    """A trial-seeded sampler: a short name (random, tpe, grid), any optuna.samplers class by name
    (with keyword arguments: {name = "TPESampler", multivariate = true}), or a sampler object.

    Named classes get seed=seed when they take one; grid: {param: values} for GridSampler.
    """
    if isinstance(spec, optuna.samplers.BaseSampler):
        return trial_seeded(spec, seed)
    name, kwargs = split_spec(spec, "sampler")
    cls_name, defaults = SAMPLERS.get(name, (name, {}))
    cls = getattr(optuna.samplers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)
            and not inspect.isabstract(cls)):
        raise ConfigError(f"unknown sampler {name!r}; use {', '.join(SAMPLERS)} or an "
                          "optuna.samplers class such as TPESampler or QMCSampler")
    missing = [m for m in _NEEDS.get(cls_name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"sampler {cls_name} needs {', '.join(missing)}, which is not "
                          f"installed: pip install {' '.join(missing)}, or choose another sampler")
    kwargs = {**defaults, **kwargs}
    if cls is optuna.samplers.GridSampler:
        kwargs.setdefault("search_space", grid or {})
    if "seed" in inspect.signature(cls).parameters:
        kwargs.setdefault("seed", seed)
    return trial_seeded(_build(cls, kwargs, "sampler"), seed)


def sampler_label(spec):
    """What a study records of its sampler: the spec, or an object's class name."""
    if isinstance(spec, optuna.samplers.BaseSampler):
        return type(spec).__name__.removeprefix("TrialSeeded")
    return spec


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


def make_pruner(spec, config):
    """A pruner: none, median (MarginMedianPruner, judging from the first full cycle on: the first
    half cycle ends at η_max, where accuracy is noisy), hyperband (resources in updates), any
    optuna.pruners class or MarginMedianPruner by name with keyword arguments, or a pruner object.
    Pruners see the first seed's validation accuracy at every half cycle (step = update)."""
    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    name, kwargs = split_spec(spec, "pruner")
    short = {"none": (optuna.pruners.NopPruner, {}),
             "median": (MarginMedianPruner, {"n_startup_trials": 5,
                                             "n_warmup_steps": config.n_s}),
             "hyperband": (optuna.pruners.HyperbandPruner,
                           {"min_resource": config.n_s, "max_resource": config.total_steps,
                            "reduction_factor": 3})}
    cls, defaults = short.get(name, (getattr(optuna.pruners, name, None), {}))
    if name == MarginMedianPruner.__name__:
        cls = MarginMedianPruner
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)
            and not inspect.isabstract(cls)):
        raise ConfigError(f"unknown pruner {name!r}; use {', '.join(PRUNERS)}, "
                          "MarginMedianPruner or an optuna.pruners class such as MedianPruner")
    return _build(cls, {**defaults, **kwargs}, "pruner")


def pruner_label(spec):
    return type(spec).__name__ if isinstance(spec, optuna.pruners.BasePruner) else spec


def is_diverged(t):
    return t.state == TrialState.FAIL and "diverged" in (t.user_attrs.get("failure") or "")


def is_done(t, count_diverged=False):
    """Whether trial t counts towards the phase's target: COMPLETE (or diverged, for a grid)."""
    return t.state in FINISHED or (count_diverged and is_diverged(t))


def n_done(study, count_diverged=False):
    """The study's trials that count towards the phase's target (see is_done)."""
    return sum(is_done(t, count_diverged) for t in study.get_trials(deepcopy=False))


def work(study, objective, target, poll=0.2, after_trial=None, count_diverged=False,
         max_diverged=None):
    """Run trials of study until it holds `target` done trials (see the module docstring).

    poll: seconds between two looks at the study while the missing trials run elsewhere; short,
      because at the end of a phase every worker but the last waits so, and the phase ends only
      when they have all seen it complete (one small query per look).
    after_trial: optional callable() run after each trial this worker ran (progress bars).
    count_diverged: a diverged trial counts as done (a grid value that was tried).
    max_diverged: stop with DivergedError once this many trials diverged (default max(5, target)):
      a protocol where every λ diverges would otherwise sample forever.
    """
    guarded = _guard_trial(objective, target, count_diverged)
    max_diverged = max_diverged or max(5, target)
    while True:
        recover_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(is_done(t, count_diverged) for t in trials)
        if done >= target:
            return done
        diverged = sum(is_diverged(t) for t in trials)
        if not count_diverged and diverged >= max_diverged:
            raise DivergedError(f"{study.study_name}: {diverged} trials diverged (non-finite "
                                "loss); lower η_max or the λ range")
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if done + running >= target and waiting == 0:
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


def _guard_trial(objective, target, count_diverged):
    """objective, wrapped for the work loop: a surplus trial or a duplicate retry is pruned before
    it trains, and an error the objective did not explain becomes the trial's failure attr."""
    def guarded(trial):
        if trial.user_attrs.get("failure") is not None:  # a retry inherits its original's attrs
            trial.set_user_attr("failure", None)
        trials = trial.study.get_trials(deepcopy=False)
        before = [t for t in trials if t.number < trial.number
                  and (is_done(t, count_diverged) or t.state == TrialState.RUNNING)]
        # pruned, not failed: a race between workers is no error (and Optuna logs no traceback)
        if len(before) >= target:
            _prune(trial, SURPLUS)
        if _is_duplicate_retry(trial.number, trials):
            _prune(trial, DUPLICATE_RETRY)
        try:
            return objective(trial)
        except (optuna.TrialPruned, DivergedError, KeyboardInterrupt):
            raise  # the objective said why, or it is no failure
        except Exception as e:
            # a FAIL without a failure attr means "the worker died" to _requeue_lost_retries
            trial.set_user_attr("failure", f"{type(e).__name__}: {e}"[:300])
            raise
    return guarded


def _prune(trial, why):
    trial.set_user_attr("failure", why)
    raise optuna.TrialPruned(why)


def _is_duplicate_retry(number, trials):
    """Whether trial `number` re-runs a dead trial that a lower-numbered trial already re-runs:
    two workers can both re-queue one dead trial (see _requeue_lost_retries); the first wins."""
    of = {t.number: retried_from(t) for t in trials}
    return of.get(number) is not None and any(
        n < number and dead == of[number] for n, dead in of.items())


def recover_trials(study):
    """Fail the trials of dead workers and re-queue them, with those a SIGTERM stopped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    _fail_orphans(study)
    _requeue_lost_retries(study)


def _requeue_lost_retries(study):
    """Re-queue the FAIL trials that died without a word (no failure attr: their worker was
    killed) or were terminated (SIGTERM: a preempted job) and were never re-queued. Failing a
    dead worker's trial and re-queuing it are two commits (Optuna's, and _fail_orphans'): a worker killed between them would leave the trial
    FAIL with no retry. Re-queuing twice is harmless: the later copy is pruned on pickup
    (_is_duplicate_retry), and the callback itself stops after max_retry retries."""
    rdb = _rdb(study)
    callback = getattr(rdb, "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is None:
        return
    # Optuna has no public accessor for the callback's max_retry (open_storage set it); a storage
    # opened elsewhere has its own, so it is read back here. Tested in test_search.py.
    max_retry = getattr(callback, "_max_retry", None)  # the callback skips longer chains itself
    trials = study.get_trials(deepcopy=False)
    requeued = {retried_from(t) for t in trials}
    for t in trials:
        if (t.state == TrialState.FAIL
                and t.user_attrs.get("failure") in (None, Terminated.FAILURE)
                and t.number not in requeued
                and (max_retry is None or len(retry_chain(t)) < max_retry)):
            log.warning("trial %d died and was not re-queued: re-queued now", t.number)
            callback(study, t)


def _rdb(study):
    """The RDBStorage behind a study. Optuna wraps it in a private caching layer and a Study has
    no public accessor for its storage; the heartbeat settings and queries below need it."""
    return getattr(study._storage, "_backend", study._storage)


def _fail_orphans(study):
    """Fail and re-queue RUNNING trials that never sent a heartbeat and are older than three grace
    periods: their worker died between creating the trial and its first heartbeat, a case
    Optuna's stale-trial check skips (it only looks at trials with a heartbeat)."""
    from optuna.storages._rdb import models  # no public API lists the heartbeats

    rdb = _rdb(study)
    if not hasattr(rdb, "scoped_session") or rdb.get_heartbeat_interval() is None:
        return
    old = datetime.timedelta(seconds=3 * (rdb.grace_period or 2 * rdb.heartbeat_interval))
    session = rdb.scoped_session()
    try:
        beating = {tid for (tid,) in session.query(models.TrialHeartbeatModel.trial_id)}
    finally:
        rdb.scoped_session.remove()
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # trial ids (FrozenTrial._trial_id, private) are what the storage's methods take
        if t._trial_id in beating or t.datetime_start is None or now - t.datetime_start < old:
            continue
        try:
            if not rdb.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        log.warning("trial %d never sent a heartbeat (its worker died at once): re-queued", t.number)
        callback = rdb.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, rdb.get_trial(t._trial_id))


def run_worker(storage_url, study_name, objective, target, make_sampler, pruner, storage_opts=None,
               after_trial=None, count_diverged=False):
    """One worker: its own storage connection and sampler, then the work loop."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        storage = open_storage(storage_url, **(storage_opts or {}))
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(),
                                  pruner=pruner)
        return work(study, objective, target, after_trial=after_trial,
                    count_diverged=count_diverged)


def run_workers(n_workers, progress=None, **worker_kwargs):
    """Run n_workers workers: in this process for one, else as forked processes sharing the data.

    progress: optional callable() polled about once a second while forked workers run.
    Returns the exit codes of the forked workers ([] for one worker in-process); raises InputError
    when a worker could not write the storage, WorkersFailed with the first error a worker reported.
    """
    if n_workers == 1:
        run_worker(after_trial=progress, **worker_kwargs)
        return []
    objective = worker_kwargs["objective"]
    warm_up(objective.data, objective.base_config)  # compiled once, inherited by every worker
    ctx = multiprocessing.get_context("fork")  # the data loaded by the parent is shared, not copied
    errors = ctx.SimpleQueue()  # (storage failure kind or None, first line) of a failed worker
    procs = [ctx.Process(target=_worker_main, name=f"worker-{i}",
                         kwargs={**worker_kwargs, "parent_pid": os.getpid(), "errors": errors})
             for i in range(n_workers)]
    for p in procs:
        p.start()
    try:
        while alive := [p for p in procs if p.is_alive()]:
            if progress:
                progress()
            # woken by a worker's exit at once: the phase ends when its last worker does. (The
            # list is taken once: a worker reaped in between would leave an empty wait of 1 s.)
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=1.0)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the workers fail their trials and stop
        stop_processes(procs, signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        raise
    for p in procs:
        p.join()
    if progress:
        progress()
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    _raise_reported(reported)
    return [p.exitcode for p in procs]


def _worker_main(parent_pid, errors, **kwargs):
    try:
        die_with_parent(parent_pid)
        run_worker(**kwargs)
    except KeyboardInterrupt as e:
        os._exit(exit_code(e))
    except Exception as e:  # the parent reports it, in one line with the others' (_raise_reported)
        log.info("worker %d stopped: %s", os.getpid(), e)
        errors.put((storage_failure_kind(e), str(e).splitlines()[0][:300] if str(e) else
                    type(e).__name__))
        os._exit(1)


def _raise_reported(reported):
    """One error for what the workers reported: InputError when the storage could not be written
    (a full disk makes other workers fail with Optuna's own errors too), else WorkersFailed."""
    kinds = [kind for kind, _ in reported if kind is not None]
    if kinds:
        raise InputError(storage_failure_message(kinds[0]))
    if reported:
        raise WorkersFailed(f"a worker stopped: {reported[0][1]}; re-run the same command to "
                            "resume")

"""The worker loop of a phase, and local worker processes.

"Run to N" semantics: a phase is done when it holds N COMPLETE trials (for a grid: N values
tried, a diverged value included), however many runs, workers and crashes it took. A worker starts
a trial only while done + running trials fall short of N; it waits while the missing trials are
running elsewhere, and takes over a trial whose worker died (its heartbeat stopped, or it died
before its first heartbeat) once it is re-queued with the same λ (search.recovery).
"""
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from model.errors import DivergedError, InputError, Terminated, WorkersFailed
from model.train import warm_up
from search.processes import die_with_parent, exit_code, stop_processes
from search.recovery import recover_trials
from search.study import (FINISHED, open_storage, retried_from, storage_failure_kind,
                          storage_failure_message)

log = logging.getLogger(__name__)

SURPLUS = "surplus: other workers completed the phase"
DUPLICATE_RETRY = "duplicate retry: an earlier trial re-runs the same dead trial"


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
            # a FAIL without a failure attr means "the worker died" (recovery._requeue_lost_retries)
            trial.set_user_attr("failure", f"{type(e).__name__}: {e}"[:300])
            raise
    return guarded


def _prune(trial, why):
    trial.set_user_attr("failure", why)
    raise optuna.TrialPruned(why)


def _is_duplicate_retry(number, trials):
    """Whether trial `number` re-runs a dead trial that a lower-numbered trial already re-runs:
    two workers can both re-queue one dead trial (see recovery._requeue_lost_retries); the first
    wins."""
    of = {t.number: retried_from(t) for t in trials}
    return of.get(number) is not None and any(
        n < number and dead == of[number] for n, dead in of.items())


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

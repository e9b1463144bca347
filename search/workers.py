"""The work loop every phase's workers run, and the local worker processes.

A worker runs trials of one study until the phase's goal is met, however many runners,
workers and crashes it takes:
- a search phase's goal is N done trials (COMPLETE; for a grid, a diverged value counts as
  tried). A worker starts a trial only while done + running trials fall short of N and waits
  while the missing trials run elsewhere; two workers racing for the last slot make at most one
  surplus trial each, recorded as such (FAIL, failure = SURPLUS) before it trains; with a
  budget, so are the trials whose earlier trials (spent + running) already commit it;
- a queued phase's goal (the confirm phase's blocks, the final run's seeds) is a result for
  every key it queued: workers take queued trials only, a trial the sampler made meanwhile is
  surplus, and a second trial queued for a key that already has one is a duplicate (both never
  train).
Every loop ends: a phase stops with one line once its pruned or failed trials reach their caps
(a pruner that prunes everything, a protocol that always diverges, an objective that returns
NaN: such a trial fails once, with its reason, and is not taken for a dead worker's), and a
queued key whose trial failed for good stops the phase instead of being waited for.
Idle workers poll the storage with a growing pause (from 0.05 s to 1 s).
"""
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from clr_lambda_search.model.errors import DivergedError, InputError, Terminated, WorkersFailed
from clr_lambda_search.model.train import warm_up
from clr_lambda_search.search import budget, record
from clr_lambda_search.search.processes import die_with_parent, exit_code, stop_processes
from clr_lambda_search.search.optuna_internals import OPTIMIZE_LOGGER
from clr_lambda_search.search.recovery import is_duplicate_retry, recover_trials
from clr_lambda_search.search.study import open_storage, storage_failure_kind, storage_failure_message

log = logging.getLogger(__name__)

POLL, MAX_POLL = 0.05, 1.0  # seconds between two looks at a study while others work


class Bookkeeping(Exception):
    """A trial stopped before training because it is surplus or a duplicate (recorded FAIL)."""


class PhaseStopped(WorkersFailed):
    """A phase hit a cap (too many pruned or failed trials) or lost a queued trial for good."""


class _QuietBookkeeping(logging.Filter):
    """Optuna logs every failed trial with a traceback; a bookkeeping trial is no failure."""

    def filter(self, rec):
        return "Bookkeeping(" not in rec.getMessage()


logging.getLogger(OPTIMIZE_LOGGER).addFilter(_QuietBookkeeping())


def is_done(t, count_diverged=False):
    """Whether trial t counts towards a search phase's target: COMPLETE (or diverged, for a
    grid)."""
    return t.state == TrialState.COMPLETE or (count_diverged and record.is_diverged(t))


def n_done(study, count_diverged=False):
    return sum(is_done(t, count_diverged) for t in study.get_trials(deepcopy=False))


def n_failed(trials, count_diverged=False):
    """Trials that failed for a reason of their own (not surplus, not a dead worker's, not a
    diverged grid value that counts as tried)."""
    return sum(t.state == TrialState.FAIL and record.failure(t) not in (None, Terminated.FAILURE)
               and not record.is_bookkeeping(t) and not (count_diverged and record.is_diverged(t))
               for t in trials)


def _common_failure(trials):
    reasons = [record.failure(t) for t in trials if t.state == TrialState.FAIL
               and record.failure(t) and not record.is_bookkeeping(t)]
    return max(set(reasons), key=reasons.count) if reasons else "unknown"


@dataclasses.dataclass
class TrialTarget:
    """A search phase's goal: n done trials, or its budget spent (search.budget), whichever
    comes first; caps on pruned and failed trials."""

    n: int
    count_diverged: bool = False
    max_pruned: int = None     # default 5 × n
    max_failed: int = None     # default max(5, n)
    pruner: str = "the pruner"
    budget: object = None      # a search.budget.Budget, or None
    trial_updates: int = 0     # what one trial trains in full (its expected cost in updates)

    def done(self, trials):
        return sum(is_done(t, self.count_diverged) for t in trials) >= self.n \
            or self._spent(trials)

    def _spent(self, trials):
        return self.budget is not None and budget.spent(trials, self.budget.unit) \
            >= self.budget.amount

    def _committed(self, trials):
        """Whether the compute spent plus what the running trials will spend (their expected
        cost) reaches the budget: no further trial may start or train."""
        if self.budget is None:
            return False
        unit = self.budget.unit
        running = sum(t.state == TrialState.RUNNING for t in trials)
        ahead = running * budget.expected_cost(trials, unit, self.trial_updates)
        return budget.spent(trials, unit) + ahead >= self.budget.amount

    def may_start(self, trials):
        done = sum(is_done(t, self.count_diverged) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if self._committed(trials):
            return False
        return done + running < self.n or waiting > 0

    def check(self, study, trials):
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        done = sum(is_done(t, self.count_diverged) for t in trials)
        if pruned >= (self.max_pruned or 5 * self.n):
            raise PhaseStopped(
                f"{study.study_name}: {pruned} trials pruned and {done} of {self.n} complete: "
                f"{self.pruner} prunes (nearly) every trial; loosen it, choose pruner = \"none\", "
                "or raise the phase's max_pruned")
        failed = n_failed(trials, self.count_diverged)
        if failed >= (self.max_failed or max(5, self.n)):
            raise PhaseStopped(f"{study.study_name}: {failed} trials failed (most often: "
                               f"{_common_failure(trials)}); fix the cause (a diverging "
                               "protocol: lower η_max or the λ range) or raise max_failed")

    def bookkeeping(self, trial, trials):
        earlier = [t for t in trials if t.number < trial.number]
        before = [t for t in earlier
                  if is_done(t, self.count_diverged) or t.state == TrialState.RUNNING]
        # racing workers that all passed may_start: the trials numbered before this one decide,
        # counting their running trials' cost too, so the budget is overrun by at most one trial
        if len(before) >= self.n or self._committed(earlier):
            return record.SURPLUS
        if is_duplicate_retry(trial.number, trials):
            return record.DUPLICATE
        return None


@dataclasses.dataclass
class QueuedTarget:
    """A queued phase's goal: a result for every key (search.record.queue_key) of `keys`."""

    keys: list
    max_failed: int = None
    count_diverged: bool = True  # a diverged trial is its key's result (confirm: accuracy 0)

    def _results(self, trials):
        return {record.queue_key(t) for t in trials if t.state == TrialState.COMPLETE
                or (self.count_diverged and record.is_diverged(t))}

    def done(self, trials):
        return set(self.keys) <= self._results(trials)

    def may_start(self, trials):
        return any(t.state == TrialState.WAITING for t in trials)

    def check(self, study, trials):
        missing = set(self.keys) - self._results(trials)
        pending = {record.queue_key(t) for t in trials
                   if t.state in (TrialState.WAITING, TrialState.RUNNING)}
        lost = [t for t in trials if record.queue_key(t) in missing - pending
                and t.state == TrialState.FAIL and record.holds_key(t)]
        if lost:
            raise PhaseStopped(f"{study.study_name}: trial {lost[0].number} "
                               f"({_key_text(record.queue_key(lost[0]))}) failed: "
                               f"{record.failure(lost[0])}; fix the cause and re-run to resume")

    def bookkeeping(self, trial, trials):
        key = record.queue_key(trial)
        if key is None:
            return record.SURPLUS  # the sampler made it: nothing was queued for it
        if any(t.number < trial.number and record.queue_key(t) == key and record.trains_key(t)
               for t in trials):
            return record.DUPLICATE
        return None


def _key_text(key):
    return ", ".join(str(k) for k in key[1:]) if key else "?"


def work(study, objective, goal, after_trial=None):
    """Run trials of study until goal.done (see the module docstring); returns the number of
    trials this worker ran."""
    guarded = _guard_trial(objective, goal)
    pause, ran = POLL, 0
    while True:
        recover_trials(study)
        trials = study.get_trials(deepcopy=False)
        met = goal.done(trials)
        if met and not any(t.state == TrialState.WAITING for t in trials):
            return ran
        # a trial queued once the goal is met (the second re-queue of one dead trial, whose first
        # copy met it) is taken and ended as surplus, untrained (_guard_trial): not left WAITING
        if not met:
            goal.check(study, trials)
        if not met and not goal.may_start(trials):
            time.sleep(pause)  # the missing trials run elsewhere: wait for them, or their death
            pause = min(MAX_POLL, pause * 1.5)
            continue
        pause = POLL
        try:
            study.optimize(guarded, n_trials=1, catch=(DivergedError, Bookkeeping),
                           gc_after_trial=False)
        except UpdateFinishedTrialError:
            # another worker finished the trial meanwhile (its worker was taken for dead)
            log.info("a trial was finished by another worker")
        except (ValueError, AssertionError):
            # the objective returned, but a recovery had failed the trial meanwhile (it took this
            # worker for dead: a heartbeat starved on an overloaded machine) and re-queued it;
            # Optuna then fails to tell the result, with a ValueError or an assertion
            if guarded.returned is None or not _finished(study, guarded.returned):
                raise
            log.warning("trial %d was failed as a dead worker's while it ran here (it was "
                        "re-queued); its result is dropped", guarded.returned)
        ran += 1
        if after_trial:
            after_trial()


def _guard_trial(objective, goal):
    """objective, wrapped for the work loop: a surplus or duplicate trial stops before it trains;
    an error the objective did not explain, or a non-finite value, becomes the trial's failure
    attr (a FAIL without one means "the worker died" to search.recovery)."""
    def guarded(trial):
        guarded.returned = None
        if record.failure(trial) is not None:  # a retry inherits its original's attrs
            record.set_failure(trial, None)
        trials = trial.study.get_trials(deepcopy=False)
        why = record.SURPLUS if goal.done(trials) else goal.bookkeeping(trial, trials)
        if why:
            record.set_failure(trial, why)
            raise Bookkeeping(why)
        try:
            value = objective(trial)
        except (optuna.TrialPruned, DivergedError, KeyboardInterrupt):
            raise  # the objective said why, or it is no failure
        except Exception as e:
            record.set_failure(trial, f"{type(e).__name__}: {e}")
            raise
        if not record.finite(value):
            record.set_failure(trial, f"{record.NOT_FINITE} ({value!r})")
        guarded.returned = trial.number  # whatever goes wrong now is the telling's
        return value
    guarded.returned = None
    return guarded


def _finished(study, number):
    """Whether trial `number` of study is no longer RUNNING."""
    return any(t.number == number and t.state.is_finished()
               for t in study.get_trials(deepcopy=False))


def run_worker(storage_url, study_name, objective, goal, make_sampler=lambda: None, pruner=None,
               storage_opts=None, after_trial=None):
    """One worker: its own storage connection and sampler, then the work loop."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        storage = open_storage(storage_url, **(storage_opts or {}))
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(),
                                  pruner=pruner)
        return work(study, objective, goal, after_trial=after_trial)


def run_workers(n_workers, progress=None, cpus=None, on_cpu_free=None, busy=None,
                **worker_kwargs):
    """Run n_workers workers: in this process for one, else as forked processes sharing the data.

    progress: optional callable() polled about once a second while forked workers run.
    cpus: confine the forked workers to this many CPUs (more workers than CPUs share them: 3
      final seeds on 2 CPUs finish together instead of the third training alone).
    on_cpu_free: optional callable run once in this process when fewer workers than CPUs are
      left (the pipeline renders its dashboard there); its failure is logged, not raised.
    busy: optional callable() -> how many trials still train or wait (default: the live
      workers; a queued phase's idle workers live on, polling, until its last trial ends).
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
    allowed = _cpu_set(cpus)
    procs = [ctx.Process(target=_worker_main, name=f"worker-{i}",
                         kwargs={**worker_kwargs, "parent_pid": os.getpid(), "errors": errors,
                                 "cpus": allowed})
             for i in range(n_workers)]
    for p in procs:
        p.start()
    slots = cpus or n_workers
    try:
        while alive := [p for p in procs if p.is_alive()]:
            if progress:
                progress()
            if on_cpu_free and (busy() if busy else len(alive)) < slots:
                _side_work(on_cpu_free)
                on_cpu_free = None
            # woken by a worker's exit at once: the phase ends when its last worker does
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


def _cpu_set(cpus):
    """The first `cpus` CPUs this process may run on; None when that is all of them (or
    affinity is not available)."""
    if not cpus or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[:cpus]) if len(allowed) > cpus else None


def _side_work(fn):
    try:
        fn()
    except Exception as e:
        log.warning("work done beside the last worker failed (%s: %s); the workers go on",
                    type(e).__name__, e)


def _worker_main(parent_pid, errors, cpus=None, **kwargs):
    try:
        die_with_parent(parent_pid)
        if cpus:
            os.sched_setaffinity(0, cpus)
        run_worker(**kwargs)
    except KeyboardInterrupt as e:
        os._exit(exit_code(e))
    except Exception as e:  # the parent reports it, in one line with the others' (_raise_reported)
        log.info("worker %d stopped: %s", os.getpid(), e)
        kind = "stopped" if isinstance(e, PhaseStopped) else storage_failure_kind(e)
        errors.put((kind, str(e).splitlines()[0][:400] if str(e) else type(e).__name__))
        os._exit(1)


def _raise_reported(reported):
    """One error for what the workers reported: InputError when the storage could not be written
    (a full disk makes other workers fail with Optuna's own errors too), PhaseStopped when a cap
    was hit, else WorkersFailed."""
    kinds = [kind for kind, _ in reported if isinstance(kind, int)]
    if kinds:
        raise InputError(storage_failure_message(kinds[0]))
    stopped = [line for kind, line in reported if kind == "stopped"]
    if stopped:
        raise PhaseStopped(stopped[0])
    if reported:
        raise WorkersFailed(f"a worker stopped: {reported[0][1]}; re-run the same command to "
                            "resume")

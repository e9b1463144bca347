"""Recovery of dead workers' trials: fail them and re-queue them with the same parameters."""
import datetime
import logging
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from clr_lambda_search.model.errors import Terminated
from clr_lambda_search.search.optuna_internals import heartbeat_trial_ids, max_retry, rdb_storage, trial_id
from clr_lambda_search.search.study import retried_from, retry_chain

log = logging.getLogger(__name__)


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
    (is_duplicate_retry), and the callback itself stops after max_retry retries."""
    rdb = rdb_storage(study)
    callback = getattr(rdb, "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is None:
        return
    # open_storage set the callback's max_retry, but a storage opened elsewhere has its own, so it
    # is read back here. Tested in test_search.py.
    limit = max_retry(callback)  # the callback skips longer chains itself
    trials = study.get_trials(deepcopy=False)
    requeued = {retried_from(t) for t in trials}
    for t in trials:
        if (t.state == TrialState.FAIL
                and t.user_attrs.get("failure") in (None, Terminated.FAILURE)
                and t.number not in requeued
                and (limit is None or len(retry_chain(t)) < limit)):
            # a terminated (SIGTERM) trial's retry is routine; a silent death is worth a warning
            log.log(logging.INFO if t.user_attrs.get("failure") else logging.WARNING,
                    "trial %d %s and was not re-queued: re-queued now", t.number,
                    "was terminated" if t.user_attrs.get("failure") else "died")
            callback(study, t)


def _fail_orphans(study):
    """Fail and re-queue RUNNING trials that never sent a heartbeat and are older than three grace
    periods: their worker died between creating the trial and its first heartbeat, a case
    Optuna's stale-trial check skips (it only looks at trials with a heartbeat)."""
    rdb = rdb_storage(study)
    if not hasattr(rdb, "scoped_session") or rdb.get_heartbeat_interval() is None:
        return
    old = datetime.timedelta(seconds=3 * (rdb.grace_period or 2 * rdb.heartbeat_interval))
    beating = heartbeat_trial_ids(rdb)
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial_id(t) in beating or t.datetime_start is None or now - t.datetime_start < old:
            continue
        try:
            if not rdb.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        log.warning("trial %d never sent a heartbeat (its worker died at once): re-queued", t.number)
        callback = rdb.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, rdb.get_trial(trial_id(t)))


def is_duplicate_retry(number, trials):
    """Whether trial `number` re-runs a dead trial that a lower-numbered trial already re-runs:
    two workers can both re-queue one dead trial (see _requeue_lost_retries); the first wins."""
    of = {t.number: retried_from(t) for t in trials}
    return of.get(number) is not None and any(
        n < number and dead == of[number] for n, dead in of.items())

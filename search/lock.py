"""A mutex held in the study storage itself, for what several runners must do exactly once.

Runners of one campaign coordinate through the storage alone (several machines share no local
folder and run no extra service). A few steps must happen once however many runners reach them
at the same moment: queueing a confirm block's (candidate, seed) trials, queueing the final run's
seeds, publishing a results folder. Each such step is short (a few storage writes); it runs under
a lock that is a study of its own: `optuna.create_study` without load_if_exists is atomic on
every database (the study name is unique: the loser gets DuplicatedStudyError), and
`optuna.delete_study` releases it. Public API only.

A holder that dies leaves its lock behind: a lock older than `stale_after` seconds (its holder
records when it took it; one that died before recording is timed from when a waiter first saw
it) is broken by the waiter that finds it stale, which checks the lock is still the same study
before deleting it. What runs under a lock re-reads the storage and does only what is missing,
so a step that a broken lock let run twice does nothing the second time.
"""
import contextlib
import logging
import os
import socket
import time

import optuna

log = logging.getLogger(__name__)

LOCK_SUFFIX = "~lock"   # not a campaign name's character (search.campaign.check_name)
STALE_AFTER = 60.0      # seconds: every step done under a lock takes well under one


def lock_name(name):
    return f"{name}{LOCK_SUFFIX}"


def is_lock(study_name):
    """Whether a study name is one of these locks (listings skip them)."""
    return study_name.endswith(LOCK_SUFFIX)


@contextlib.contextmanager
def storage_lock(storage, name, stale_after=STALE_AFTER, poll=0.02, max_poll=0.5):
    """Hold the lock `name` (e.g. a study's name) in storage while the block runs."""
    held = _acquire(storage, lock_name(name), stale_after, poll, max_poll)
    try:
        yield
    finally:
        _release(storage, held)


def _acquire(storage, name, stale_after, poll, max_poll):
    first_seen = {}  # lock study id -> when this process first found it held
    while True:
        try:
            study = optuna.create_study(study_name=name, storage=storage)
        except optuna.exceptions.DuplicatedStudyError:
            _break_if_stale(storage, name, first_seen, stale_after)
            time.sleep(poll)
            poll = min(max_poll, poll * 1.5)
            continue
        study.set_user_attr("held_since", time.time())
        study.set_user_attr("holder", f"{socket.gethostname()}:{os.getpid()}")
        return storage.get_study_id_from_name(name)


def _study_id(storage, name):
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _break_if_stale(storage, name, first_seen, stale_after):
    try:
        _break_stale(storage, name, first_seen, stale_after)
    except KeyError:
        pass  # released meanwhile


def _break_stale(storage, name, first_seen, stale_after):
    study_id = _study_id(storage, name)
    if study_id is None:
        return  # released meanwhile
    since = storage.get_study_user_attrs(study_id).get("held_since")
    since = since if since is not None else first_seen.setdefault(study_id, time.time())
    if time.time() - since < stale_after:
        return
    holder = storage.get_study_user_attrs(study_id).get("holder", "unknown")
    if _study_id(storage, name) == study_id:  # still the stale one, not a new holder's
        log.warning("breaking the lock %s of %s, held for %.0f s (its holder died?)", name,
                    holder, time.time() - since)
        _delete(storage, study_id)


def _release(storage, study_id):
    _delete(storage, study_id)


def _delete(storage, study_id):
    try:
        storage.delete_study(study_id)
    except KeyError:
        pass  # already broken by a waiter that took it for stale

"""The storage lock: real processes counting under it lose no increment; a dead holder's lock is
broken once stale, and only the stale one."""
import multiprocessing
import os
import time

import optuna
import pytest

from clr_lambda_search.search.lock import is_lock, lock_name, storage_lock
from clr_lambda_search.search.study import open_storage

PROCESSES, INCREMENTS = 4, 8


def _count(url, n):
    storage = open_storage(url)
    study = optuna.load_study(study_name="counter", storage=storage)
    for _ in range(n):
        with storage_lock(storage, "counter"):
            value = study.user_attrs.get("n", 0)  # read-modify-write: loses counts unlocked
            time.sleep(0.001)
            study.set_user_attr("n", value + 1)


def _urls(tmp_path):
    urls = [f"sqlite:///{tmp_path}/lock.db"]
    if os.environ.get("CLR_PG_URL"):
        urls.append(os.environ["CLR_PG_URL"])
    return urls


def test_processes_counting_under_the_lock_lose_nothing(tmp_path):
    for url in _urls(tmp_path):
        storage = open_storage(url)
        if "counter" in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name="counter", storage=storage)
        optuna.create_study(study_name="counter", storage=storage)
        storage.engine.dispose()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_count, args=(url, INCREMENTS)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * PROCESSES
        study = optuna.load_study(study_name="counter", storage=storage)
        assert study.user_attrs["n"] == PROCESSES * INCREMENTS, url
        assert not [n for n in optuna.get_all_study_names(storage) if is_lock(n)]
        optuna.delete_study(study_name="counter", storage=storage)


def test_a_dead_holders_lock_is_broken_once_stale(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/lock.db")
    dead = optuna.create_study(study_name=lock_name("x"), storage=storage)
    dead.set_user_attr("held_since", time.time() - 3600)
    with storage_lock(storage, "x", stale_after=60):
        assert lock_name("x") in optuna.get_all_study_names(storage)
    assert lock_name("x") not in optuna.get_all_study_names(storage)


def test_a_fresh_lock_is_waited_for_not_broken(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/lock.db")
    held = optuna.create_study(study_name=lock_name("x"), storage=storage)
    held.set_user_attr("held_since", time.time())
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        with _deadline(0.5):
            with storage_lock(storage, "x", stale_after=60):
                pass
    assert time.monotonic() - start >= 0.5
    assert optuna.load_study(study_name=lock_name("x"), storage=storage).user_attrs["held_since"]


class _deadline:
    """Raise TimeoutError in this thread after `seconds` (SIGALRM)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fire(*_):
            raise TimeoutError
        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False

"""Helpers shared by test_search.py and test_faults.py: run scripts/search.py as users run it, and
read a study back without the code under test.

Reading a storage:
- `poll_trials` reads (number, state) with plain SQL while scripts run. It never creates a file, a
  table or a study (an SQLite file is opened read-only), so it cannot join the creation race of a
  fresh storage that it is meant to observe.
- `load_trials` loads the FrozenTrials with Optuna's own RDBStorage (no heartbeat), once the
  processes have stopped.
"""
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from clr_lambda_search.search import record
from clr_lambda_search.search.study import retried_from

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "scripts" / "search.py"
PG_ENV = "CLR_PG_URL"

# A trial on the tiny CIFAR-10 (180 train images, --n-val 20): 2·n_s updates of 20 images.
# n_s 20 -> ~0.1 s per trial; n_s 200 -> ~0.4 s (long enough to be killed mid-trial).
TINY = ["--n-val", "20", "--n-s", "20", "--cycles", "1", "--n-batch", "20"]
LONG = ["--n-val", "20", "--n-s", "200", "--cycles", "1", "--n-batch", "20"]
# The errors of concurrent SQLite/PostgreSQL access that must never reach a user.
RACE_ERRORS = ("database is locked", "already exists", "UNIQUE constraint", "duplicate key",
               "UpdateFinishedTrialError")


def script_env(tmp):
    """The caller's environment minus $CIFAR10_*, with the data cache in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    env["CIFAR10_CACHE"] = str(Path(tmp) / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sqlite_url(path):
    return f"sqlite:///{path}"


def search_args(phase, storage, campaign, data_dir=None, *extra):
    args = [phase, "--storage", storage, "--campaign", campaign]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return args + [str(a) for a in extra]


# The child's Python handles SIGINT itself before it runs the script, whatever disposition it
# inherited (a shell without job control starts pytest with SIGINT ignored, and an ignored signal
# survives exec): the tests that Ctrl-C a script do not depend on the pytest process's state. Not
# a preexec_fn: that forks pytest and runs Python in the child, which gRPC's fork handlers can
# abort once gRPC is loaded in pytest (see conftest).
_LAUNCH = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def script_command(script, args):
    """The command line of `python script ARGS` with SIGINT handled (see _LAUNCH)."""
    return [sys.executable, "-c", _LAUNCH, str(script), *map(str, args)]


def start(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    """scripts/search.py ARGS as a child process (cwd = repo root, text mode)."""
    return subprocess.Popen(script_command(SEARCH, args), cwd=REPO, env=env,
                            stdout=stdout, stderr=stderr, text=True)


def run(args, env, timeout=120):
    """Run scripts/search.py ARGS to the end; CompletedProcess (stdout, stderr as text)."""
    return subprocess.run(script_command(SEARCH, args), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def stop(proc):
    """Kill proc if it still runs (test clean-up), and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def stderr_lines(text):
    """stderr as lines, with tqdm's carriage-return redraws split off and blank lines dropped."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def race_errors(text):
    """The lines of text that report a lock or creation race."""
    return [line for line in stderr_lines(text) if any(e in line for e in RACE_ERRORS)]


def _engine(url):
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        return sqlalchemy.create_engine(
            "sqlite://", poolclass=sqlalchemy.pool.NullPool,
            creator=lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30))
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)


def poll(url, study_name):
    """{number: (state name, has a heartbeat row)} of the study's trials, read-only; {} while the
    study does not exist yet."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).is_file():
        return {}
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT t.number, t.state, h.trial_id FROM trials t "
                "JOIN studies s ON s.study_id = t.study_id "
                "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE s.study_name = :name"), {"name": study_name}).all()
    except sqlalchemy.exc.DBAPIError:  # no schema yet, or a write lock held past the timeout
        return {}
    finally:
        engine.dispose()
    return {int(n): (str(getattr(s, "name", s)), h is not None) for n, s, h in rows}


def poll_trials(url, study_name):
    """{number: state name} of the study's trials, read-only; {} while it does not exist yet."""
    return {n: state for n, (state, _) in poll(url, study_name).items()}


def wait_for(predicate, timeout, what, proc=None, interval=0.05):
    """Poll predicate() until it returns something truthy; fail the test after timeout seconds.

    proc: a child process whose early exit also ends the wait (its stderr goes in the message).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the script exited ({proc.returncode}) while waiting for {what}:\n"
                        f"{err[-2000:]}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_for_new_running(url, study_name, known, timeout, proc=None):
    """The numbers of RUNNING trials that are not in `known` (waits until there is one)."""
    def new_running():
        return sorted(n for n, s in poll_trials(url, study_name).items()
                      if s == "RUNNING" and n not in known)
    return wait_for(new_running, timeout, f"a new RUNNING trial in {study_name}", proc)


def beating(url, study_name):
    """Numbers of the RUNNING trials whose heartbeat thread has recorded a heartbeat."""
    return {n for n, (s, hb) in poll(url, study_name).items() if s == "RUNNING" and hb}


def load_trials(url, study_name):
    """The study's FrozenTrials (by number) and record attrs (search.record.stored: its user
    attrs and the record's system attrs), via Optuna without heartbeats."""
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    storage = RDBStorage(url, engine_kwargs=kwargs)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        return study.trials, record.stored(study)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def study_names(url):
    storage = RDBStorage(url)
    try:
        return sorted(optuna.get_all_study_names(storage))
    finally:
        storage.remove_session()
        storage.engine.dispose()


def retried_trial_number(frozen):
    """The first trial of the retry chain this FrozenTrial belongs to (None if no retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def complete(trials):
    return [t for t in trials if t.state == TrialState.COMPLETE]


def unfinished(trials):
    """(number, state) of the trials left RUNNING or WAITING."""
    return [(t.number, t.state.name) for t in trials
            if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def duplicated_lams(trials):
    """λ values shared by two COMPLETE trials (a retry never completes beside its original,
    which is FAIL, so any shared λ here is a trial run twice)."""
    seen, dups = set(), []
    for t in complete(trials):
        values = tuple(sorted(t.params.items()))
        if values in seen:
            dups.append(values)
        seen.add(values)
    return dups


def retries_by_origin(trials):
    """{trial number: [FrozenTrial re-queued for it when its worker died], ...}.

    The retry of trial n is the trial whose retry chain ends with n (search.study.retried_from;
    retried_trial_number names the first trial of a chain, also for the retry of a retry)."""
    out = {}
    for t in trials:
        origin = retried_from(t)
        if origin is not None:
            out.setdefault(origin, []).append(t)
    return out


def pg_url_or_skip():
    """$CLR_PG_URL; without it the test fails on CI (CI=set) and is skipped elsewhere."""
    url = os.environ.get(PG_ENV)
    if url:
        return url
    message = f"${PG_ENV} is not set: no PostgreSQL server to test against (.ci/run sets it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def init_schema(url):
    """Create Optuna's tables in an empty database once, before processes share it (a fresh
    storage opened by several processes at once races; test_search covers that race)."""
    storage = RDBStorage(url)
    storage.remove_session()
    storage.engine.dispose()

"""A load test of the storage under the project's own worker loop, with a fast objective.

    python tests/loadtest.py --storage postgresql+psycopg://… --workers 64 --trials 2000
    python tests/loadtest.py --storage postgresql+psycopg://… --proxy --workers 64 --trials 2000
    python tests/loadtest.py --storage sqlite:////tmp/load.db --workers 8 --trials 2000

N forked processes each run search.workers.run_worker (the work loop every phase runs: recovery,
the trial target, surplus bookkeeping, heartbeats, the claiming storage) on one study until it
holds --trials COMPLETE trials; only the objective is a stand-in that sleeps a few milliseconds.
With --proxy the workers go through scripts/storage_proxy.py in front of --storage. Prints one
line:

    LOAD: storage=postgresql workers=64 trials=2000 trials_per_s=… errors=0 lost=0 duplicated=0
          peak_connections=… round_trips_per_trial=… storage_ms_per_trial=… seconds=…

errors: exceptions raised by storage calls in the workers (a call that failed and was retried
counts), plus workers that exited non-zero; lost: trials short of --trials COMPLETE, and trials
left RUNNING or WAITING; duplicated: COMPLETE trials beyond --trials, and trial numbers the
objective ran twice; peak_connections: the most connections to the database at once
(pg_stat_activity, PostgreSQL only, this script's own sampling connection excluded);
round_trips_per_trial / storage_ms_per_trial: the workers' outermost storage calls (one database
round trip or more each, or one RPC through the proxy) and the time spent in them, per COMPLETE
trial.
"""
import argparse
import functools
import logging
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import sqlalchemy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clr_lambda_search.search.study import mask_url, open_storage  # noqa: E402
from clr_lambda_search.search.workers import TrialTarget, run_worker  # noqa: E402

OBJECTIVE_S = 0.003  # the stand-in objective's few milliseconds


def fast_objective(trial):
    lam = trial.suggest_float("lam", 1e-5, 1e-1, log=True)
    time.sleep(OBJECTIVE_S)
    _RAN.append(trial.number)
    return -abs(math.log10(lam) + 3)


_RAN = []  # trial numbers this worker's objective ran
_STATS = {"calls": 0, "seconds": 0.0, "errors": 0}
_DEPTH = threading.local()


def _counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = getattr(_DEPTH, "n", 0) == 0
        _DEPTH.n = getattr(_DEPTH, "n", 0) + 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception:
            if outer:
                _STATS["errors"] += 1
            raise
        finally:
            _DEPTH.n -= 1
            if outer:
                _STATS["calls"] += 1
                _STATS["seconds"] += time.perf_counter() - start
    return wrapper


# methods that answer from the process itself (no round trip)
_LOCAL = {"close", "remove_session", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback",
          "get_failed_trial_callback", "wait_server_ready", "_setup"}


def _instrument(cls):
    """Count the outermost calls of the storage's public methods (and their exceptions)."""
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if (callable(value) and not name.startswith("__") and name not in _LOCAL
                    and not isinstance(value, (staticmethod, classmethod, property))
                    and not getattr(getattr(cls, name), "_counted", False)):
                wrapped = _counted(getattr(cls, name))
                wrapped._counted = True
                setattr(cls, name, wrapped)


def _worker(url, study, target, seed, results):
    logging.disable(logging.WARNING)  # the per-trial lines are not the point here
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage_cls = type(open_storage(url))
    _instrument(storage_cls)
    code = 0
    try:
        run_worker(url, study, fast_objective, TrialTarget(n=target),
                   make_sampler=lambda: optuna.samplers.RandomSampler(seed=seed))
    except BaseException as e:  # reported, counted as an error
        print(f"worker {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    results.put((dict(_STATS), list(_RAN), code))


def _pg_connections(url, stop, peak):
    # autocommit: inside a transaction PostgreSQL answers from one snapshot of its statistics
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        while not stop.is_set():
            n = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()").scalar()
            peak[0] = max(peak[0], n)
            stop.wait(0.1)
    engine.dispose()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(url):
    """scripts/storage_proxy.py in front of url; (process, grpc URL) once it listens."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "storage_proxy.py"),
                             "--storage", url, "--port", str(port), "-q"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "storage proxy" not in line:
        proc.kill()
        raise RuntimeError(f"the storage proxy did not start: {line!r}")
    return proc, f"grpc://127.0.0.1:{port}"


def run(url, workers, trials, proxy=False, study_name=None):
    """Run the load test; the dict of figures the LOAD line prints."""
    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    study_name = study_name or f"load-{os.getpid()}-{int(time.time())}"
    storage = open_storage(url)
    optuna.create_study(study_name=study_name, storage=storage, direction="maximize")
    storage.remove_session()
    storage.engine.dispose()
    proxy_proc, worker_url = start_proxy(url) if proxy else (None, url)
    stop, peak = threading.Event(), [0]
    sampler = None
    if backend == "postgresql":
        sampler = threading.Thread(target=_pg_connections, args=(url, stop, peak), daemon=True)
        sampler.start()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(worker_url, study_name, trials, 1000 + i, results))
             for i in range(workers)]
    try:
        for p in procs:
            p.start()
        got = [results.get() for _ in procs]
        for p in procs:
            p.join()
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        if sampler:
            sampler.join()
        if proxy_proc:
            proxy_proc.terminate()
            proxy_proc.wait()
    check = optuna.storages.RDBStorage(url)
    frozen = optuna.load_study(study_name=study_name, storage=check).get_trials(deepcopy=False)
    complete = sum(t.state.name == "COMPLETE" for t in frozen)
    pending = sum(t.state.name in ("RUNNING", "WAITING") for t in frozen)
    ran = [n for _, numbers, _ in got for n in numbers]
    calls = sum(s["calls"] for s, _, _ in got)
    spent = sum(s["seconds"] for s, _, _ in got)
    check.remove_session()
    check.engine.dispose()
    return {
        "storage": f"{backend}+grpc" if proxy else backend,
        "workers": workers, "trials": complete,
        "trials_per_s": round(complete / seconds, 1),
        "errors": sum(s["errors"] for s, _, _ in got) + sum(code != 0 for _, _, code in got),
        "lost": max(0, trials - complete) + pending,
        "duplicated": max(0, complete - trials) + (len(ran) - len(set(ran))),
        "peak_connections": peak[0] if backend == "postgresql" else "n/a",
        "round_trips_per_trial": round(calls / max(1, complete), 1),
        "storage_ms_per_trial": round(1000 * spent / max(1, complete), 1),
        "surplus": sum(t.state.name == "FAIL" for t in frozen),
        "seconds": round(seconds, 1),
        "url": mask_url(worker_url),
    }


def load_line(figures):
    return "LOAD: " + " ".join(f"{k}={v}" for k, v in figures.items())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--proxy", action="store_true", help="through scripts/storage_proxy.py")
    args = p.parse_args()
    if args.workers < 1 or args.trials < 1:
        p.error("--workers and --trials must be at least 1")
    print(load_line(run(args.storage, args.workers, args.trials, args.proxy)), flush=True)


if __name__ == "__main__":
    main()

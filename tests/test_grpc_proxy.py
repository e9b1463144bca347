"""--storage grpc://host:port through scripts/storage_proxy.py in front of CI's PostgreSQL: the
same guarantees as a direct connection. A worker killed mid-trial behind the proxy (Optuna's
GrpcStorageProxy has no heartbeat of its own) has its trial failed and re-queued by the proxy
itself, with no worker running, and the phase then completes with exactly its trials.

Real processes: the proxy, scripts/search.py workers; the database is read directly with Optuna
(faultlib). Needs $CLR_PG_URL and grpcio (the grpc extra).
"""
import signal
import socket
import subprocess
import sys
import uuid

import pytest

import faultlib as fl
from clr_lambda_search.search.study import mask_url

pytest.importorskip("grpc", reason="the grpc extra (grpcio) is not installed")

pytestmark = [pytest.mark.postgres, pytest.mark.faults]

PROXY = fl.REPO / "scripts" / "storage_proxy.py"
HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "3"]
# ~2 s a trial on the tiny CIFAR-10: still running when the test has seen it sample and kills it
SLOW = ["--n-val", "20", "--n-s", "1000", "--cycles", "1", "--n-batch", "20"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(url, env, port):
    proc = subprocess.Popen([sys.executable, str(PROXY), "--storage", url, "--port", str(port),
                             *HEARTBEAT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once the proxy listens
    if "storage proxy" not in line:
        proc.kill()
        pytest.fail(f"the proxy did not start: {line!r} {proc.communicate()[1][-2000:]}")
    return proc


@pytest.fixture
def proxy(tmp_path):
    url = fl.pg_url_or_skip()
    fl.init_schema(url)
    env = fl.script_env(tmp_path)
    port = free_port()
    proc = start_proxy(url, env, port)
    try:
        yield url, f"grpc://127.0.0.1:{port}", env
    finally:
        fl.stop(proc)


@pytest.mark.timeout(240)
def test_a_worker_killed_behind_the_proxy_is_retried_and_the_phase_completes(
        proxy, cifar_tiny_dir, tmp_path):
    pg, grpc_url, env = proxy
    campaign = f"grpc-{uuid.uuid4().hex[:10]}"
    name = f"{campaign}-coarse"
    args = fl.search_args("coarse", grpc_url, campaign, cifar_tiny_dir.batches, "--n-trials", 4,
                          "--workers", 1, *HEARTBEAT, *SLOW)
    victim = fl.start(args, env)
    try:
        # a trial whose heartbeat went through the proxy into the database's heartbeat table
        dead = min(fl.wait_for(lambda: fl.beating(pg, name), 120, "a beating trial", victim))
        fl.wait_for(lambda: fl.load_trials(pg, name)[0][dead].params, 60,
                    f"trial {dead} to sample its λ", victim)  # it trains from here on
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        # no worker runs now: the proxy alone fails the dead trial and re-queues it
        fl.wait_for(lambda: fl.poll_trials(pg, name).get(dead) == "FAIL"
                    and "WAITING" in fl.poll_trials(pg, name).values(), 60,
                    f"the proxy to fail and re-queue trial {dead}")
        done = fl.run(args, env, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        trials, _ = fl.load_trials(pg, name)
        assert len(fl.complete(trials)) == 4, [(t.number, t.state.name) for t in trials]
        assert fl.unfinished(trials) == []
        assert fl.duplicated_lams(trials) == []
        retries = fl.retries_by_origin(trials)
        by_number = {t.number: t for t in trials}
        assert [t.params for t in retries.get(dead, [])] == [by_number[dead].params], retries
        assert any(t.state.name == "COMPLETE" for t in retries[dead])
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()


def test_a_proxy_url_is_checked_in_one_line(tmp_path, cifar_tiny_dir):
    env = fl.script_env(tmp_path)
    port = free_port()  # nothing listens there
    for url, says in ((f"grpc://127.0.0.1:{port}", "no storage proxy answers"),
                      ("grpc://127.0.0.1", "malformed storage URL")):
        r = fl.run(fl.search_args("coarse", url, "c", cifar_tiny_dir.batches, "--n-trials", 1),
                   env, timeout=60)
        assert r.returncode == 2, r.stderr
        lines = fl.stderr_lines(r.stderr)
        assert len(lines) == 1 and says in lines[0], r.stderr
    assert mask_url("grpc://127.0.0.1:13000") == "grpc://127.0.0.1:13000"


def test_the_proxy_refuses_bad_input_in_one_line(tmp_path):
    env = fl.script_env(tmp_path)
    for args, says in ((["--storage", "grpc://127.0.0.1:1"], "not another proxy"),
                       (["--storage", "sqlite:///x.db", "--port", "0"], "--port must be")):
        r = subprocess.run([sys.executable, str(PROXY), *args], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        lines = fl.stderr_lines(r.stderr)
        assert len(lines) == 1 and says in lines[0], r.stderr

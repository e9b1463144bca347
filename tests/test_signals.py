"""Signals and hangs: SIGTERM stops a run and all its processes within seconds with exit 143 and
one line; a storage server that never answers cannot hang a command. (SIGTERM and a killed parent
during a search: tests/test_faults.py, for the FAULTS line.)"""
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from faultlib import script_command
from test_cli_errors import script_env
from test_faults import alive, children

REPO = Path(__file__).resolve().parents[1]


def start(script, args, cache):
    return subprocess.Popen(script_command(REPO / "scripts" / script, args), cwd=REPO,
                            env=script_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


@pytest.mark.timeout(180)
def test_sigterm_stops_the_final_run_and_its_seed_processes(cifar_tiny_dir, tmp_path):
    out = tmp_path / "final"
    proc = start("final.py", ["--lam", "0.01", "--seeds", "3", "--workers", "2", "--n-val", "20",
                              "--n-s", "20000", "--cycles", "1", "--n-batch", "20", "--data-dir",
                              str(cifar_tiny_dir.batches), "--out", str(out), "--storage",
                              f"sqlite:///{tmp_path / 's.db'}", "-q"], tmp_path)
    try:
        seeds = wait_until(lambda: len(children(proc.pid)) >= 3 and children(proc.pid), 60)
        assert seeds, proc.communicate()[1][-2000:]
        time.sleep(1.0)  # training
        proc.send_signal(signal.SIGTERM)
        left = wait_until(lambda: not alive([proc.pid, *seeds]), 5)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert left, f"still alive 5 s after SIGTERM: {alive([proc.pid, *seeds])}"
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated:"), err
    assert not out.exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".final")] == []


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.timeout(120)
def test_a_server_that_never_answers_does_not_hang_status(silent_server, tmp_path):
    start_time = time.monotonic()
    proc = start("search.py", ["status", "--storage",
                               f"postgresql+psycopg://u@127.0.0.1:{silent_server}/db"], tmp_path)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("status still waits for a silent server after 60 s")
    assert proc.returncode == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and "cannot open storage" in err, err
    assert time.monotonic() - start_time < 45


@pytest.mark.timeout(120)
def test_sigterm_stops_a_training_run_with_one_line(cifar_tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = start("train.py", ["--n-val", "20", "--n-s", "50000", "--cycles", "1", "--n-batch",
                              "20", "--data-dir", str(cifar_tiny_dir.batches), "--out", str(out)],
                 tmp_path)
    try:
        log = []
        for line in proc.stderr:  # the data is loaded: training starts
            log.append(line)
            if "CIFAR-10 from" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, "".join(log) + err[-2000:]
    assert err.splitlines()[-1].startswith("terminated:") and "Traceback" not in err, err
    assert not out.exists()

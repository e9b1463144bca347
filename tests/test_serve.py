"""`dashboard.py --serve`: read-only unless --allow-writes, artifacts that never run script in the
dashboard's origin (headless Chromium counts the executions of a hostile HTML artifact), and a
bad --host or --port is one line, exit 2."""
import html
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import optuna
import pytest

from test_dashboard import CHROMIUM_FLAGS, chromium_or_skip

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
HOSTILE = """<!doctype html><html><head><title>quiet</title></head><body>
<script>
document.title = "PWNED";
var p = document.createElement("pre"); p.id = "pwned"; p.textContent = "PWNED";
document.body.appendChild(p);
fetch("http://127.0.0.1:BEACON/hit-fetch").catch(function () {});
new Image().src = "http://127.0.0.1:BEACON/hit-image";
</script></body></html>
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Beacon:
    """A local HTTP server counting the requests a script sends it (/hit…), and serving at
    /frame?<url> a page without script that embeds <url> in an iframe (a top-level navigation to
    a download never ends in headless Chromium)."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/frame?"):
                    src = html.escape(urllib.parse.unquote(self.path.split("?", 1)[1]))
                    body = f'<!doctype html><p>frame</p><iframe src="{src}"></iframe>'.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path.startswith("/hit"):  # not /favicon.ico
                    hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def beacon():
    b = Beacon()
    yield b
    b.close()


def make_storage(base, beacon_port):
    """A study with a hostile HTML artifact (recorded as text/html) and a PNG one; returns the
    storage URL, the final folder the artifacts sit beside, and the artifacts' ids."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{base / 's.db'}"
    study = optuna.create_study(study_name="w-coarse", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lam", 1e-5, 1e-1, log=True), n_trials=1)
    (base / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(base / "artifacts"))
    page = base / "hostile.html"
    page.write_text(HOSTILE.replace("BEACON", str(beacon_port)), encoding="utf-8")
    png = base / "figure.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    ids = {"html": upload_artifact(artifact_store=store, file_path=str(page),
                                   study_or_trial=study, mimetype="text/html"),
           "png": upload_artifact(artifact_store=store, file_path=str(png),
                                  study_or_trial=study, mimetype="image/png")}
    return url, base / "final", study._study_id, ids


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    return e


class Server:
    def __init__(self, url, final, *extra):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "dashboard.py"), "--serve", "--storage", url,
             "--final-dir", str(final), "--port", str(self.port), *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        self.banner = self.proc.stdout.readline()  # printed once the socket listens
        assert "optuna-dashboard on http://127.0.0.1" in self.banner, self.stop()

    def request(self, method, path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture(scope="module")
def served(tmp_path_factory, beacon):
    base = tmp_path_factory.mktemp("serve")
    url, final, study_id, ids = make_storage(base, beacon.port)
    server = Server(url, final)
    yield {"server": server, "url": url, "study": study_id, "ids": ids, "base": base}
    server.stop()


def study_names(url):
    return [s.study_name for s in optuna.get_all_study_summaries(url)]


@pytest.mark.parametrize("method, path, body", [
    ("DELETE", "/api/studies/{study}", None),
    ("POST", "/api/studies", b'{"study_name": "x", "directions": ["maximize"]}'),
    ("PUT", "/api/studies/{study}/note", b'{"version": 1, "body": "x"}'),
    ("PATCH", "/api/studies/{study}", b"{}"),
    ("DELETE", "/api/artifacts/{study}/{html}", None),
])
def test_writing_requests_are_refused(served, method, path, body):
    path = path.format(study=served["study"], html=served["ids"]["html"])
    status, headers, _ = served["server"].request(method, path, body)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert study_names(served["url"]) == ["w-coarse"]  # nothing deleted, nothing created
    assert (served["base"] / "artifacts" / served["ids"]["html"]).is_file()
    status, _, page = served["server"].request("GET", "/api/studies")
    assert status == 200 and b"w-coarse" in page  # reading still works


def test_allow_writes_lets_a_delete_through(tmp_path, beacon):
    url, final, study_id, _ = make_storage(tmp_path, beacon.port)
    server = Server(url, final, "--allow-writes")
    try:
        assert "read-write" in server.banner
        status, _, _ = server.request("DELETE", f"/api/studies/{study_id}")
    finally:
        server.stop()
    assert status == 204 and study_names(url) == []


def test_artifacts_are_sandboxed_without_cors(served):
    server, study, ids = served["server"], served["study"], served["ids"]
    status, headers, body = server.request("GET", f"/artifacts/{study}/{ids['html']}")
    assert status == 200 and b"PWNED" in body  # served, as it was uploaded ...
    # ... but sandboxed: no script, an opaque origin, no subresource it could call home with
    assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = server.request("GET", f"/artifacts/{study}/{ids['png']}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert "Content-Disposition" not in headers  # shown inline
    assert headers["Content-Security-Policy"].startswith("sandbox")
    assert "Access-Control-Allow-Origin" not in headers


def open_in_chromium(url, profile):
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "<p>frame</p>" in out, err[-2000:]  # the page loaded
    return out


@contextlib.contextmanager
def unguarded(served):
    """optuna-dashboard itself on the same storage and artifacts, in this process: the control."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    app = wsgi(served["url"], artifact_store=FileSystemArtifactStore(str(served["base"] /
                                                                         "artifacts")))
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def artifact_in_a_frame(beacon, port, served):
    url = f"http://127.0.0.1:{port}/artifacts/{served['study']}/{served['ids']['html']}"
    return f"http://127.0.0.1:{beacon.port}/frame?{urllib.parse.quote(url, safe='')}"


@pytest.mark.browser
def test_a_hostile_html_artifact_runs_no_script(served, beacon, tmp_path):
    chromium_or_skip()
    # the control: optuna-dashboard alone serves it as a page whose script runs, and calls home
    with unguarded(served) as port:
        beacon.hits.clear()
        open_in_chromium(artifact_in_a_frame(beacon, port, served), tmp_path / "p0")
        assert sorted(beacon.hits) == ["/hit-fetch", "/hit-image"], beacon.hits
    beacon.hits.clear()
    open_in_chromium(artifact_in_a_frame(beacon, served["server"].port, served), tmp_path / "p1")
    assert beacon.hits == []  # zero executions: no request sent
    status, _, _ = served["server"].request("GET", "/api/studies")
    assert status == 200  # the server was up all along


@pytest.mark.parametrize("args, needle", [
    (["--port", "70000"], "--port 70000"),
    (["--port", "0"], "--port 0"),
    (["--port", "-1"], "--port -1"),
    (["--host", "no-such-host.invalid"], "no-such-host.invalid"),
    (["--port", "{busy}"], "{busy}"),
])
def test_bad_host_or_port_is_one_line(args, needle, served):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = [a.replace("{busy}", port) for a in args]
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "dashboard.py"), "--serve",
                               "--storage", served["url"], *args], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert needle.replace("{busy}", port) in proc.stderr and proc.stdout == ""

"""Secrets: a storage password, in any form of the URL, is never printed, and the URL can be kept
out of the command line ($OPTUNA_STORAGE, as Optuna's own CLI reads it)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clr_lambda_search.search.study import mask_url, redact, url_secrets
from test_cli_errors import script_env

REPO = Path(__file__).resolve().parents[1]
SECRET = "hunter2"
TINY = ["--n-val", "20", "--n-s", "5", "--cycles", "1", "--n-batch", "20", "--pruner", "none"]

URLS = [
    f"postgresql+psycopg://u:{SECRET}@db.example/clr",                       # user:password@
    f"postgresql+psycopg://u@db.example/clr?password={SECRET}",              # query parameter
    f"postgresql+psycopg://u@db.example/clr?sslmode=require&sslpassword={SECRET}",
    f"postgresql+psycopg://u:{SECRET}%40x@db.example/clr",                   # percent-encoded
    f"postgresql+psycopg://u:{SECRET}@db.example:notaport/clr?password={SECRET}",  # malformed
    f"not a url://u:{SECRET}@host/db?token={SECRET}",                        # unparsable
]


@pytest.mark.parametrize("url", URLS)
def test_every_form_of_password_is_masked(url):
    assert SECRET not in mask_url(url)
    assert "***" in mask_url(url)
    assert SECRET not in redact(f"driver said: could not connect with {url}", url)
    assert any(SECRET in s for s in url_secrets(url))


# Text no parser takes for a URL: its password is masked all the same, by where it stands.
ODD = "Zq9xWkV7pJ"  # no 4-character piece of these occurs in any message
AT = "Zq9x@WkV7pJ"  # an unencoded @ inside the password
UNPARSED = [
    f"postgresql+psycopg:/u:{ODD}@db.example/clr",           # one slash after the scheme
    f"postgresql+psycopg:u:{ODD}@db.example/clr",            # no slash
    f"u:{ODD}@db.example/clr",                               # no scheme
    f"postgresql+psycopg:\\\\u:{ODD}@db.example\\clr",       # backslashes
    f"postgresql+psycopg//u:{ODD}@db.example/clr",           # no : before the host part
    f"postgresql+psycopg://u:{AT}@db.example/clr",           # @ in the password
    f"postgresql+psycopg:/u:{AT}@127.0.0.1:1/clr",           # both
    f"u:{AT}@127.0.0.1:1/clr?password={ODD}",
]


def pieces(secret, size=4):
    return {secret[i:i + size] for i in range(len(secret) - size + 1)}


def leaked(text):
    return sorted(p for secret in (ODD, AT) for p in pieces(secret) if p in text)


@pytest.mark.parametrize("url", UNPARSED)
def test_unparsed_forms_are_masked(url):
    assert leaked(mask_url(url)) == [] and "***" in mask_url(url)
    assert leaked(redact(f"driver said: {url} refused", url)) == []
    assert "db.example" in mask_url(url) or "127.0.0.1:1" in mask_url(url)  # the host stays


@pytest.mark.parametrize("url", UNPARSED)
def test_unparsed_forms_are_masked_in_the_error(url, tmp_path):
    proc = run([script("search.py"), "status", "--storage", url], tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert leaked(proc.stdout + proc.stderr) == [], proc.stderr
    assert "***" in proc.stderr  # the URL is named, masked


def test_masking_keeps_what_is_not_secret():
    url = "postgresql+psycopg://alice@db.example:5433/clr?sslmode=require"
    assert mask_url(url) == url
    url = "sqlite:////tmp/run:2@night.db"  # a path holding : and @ is no password
    assert mask_url(url) == url and url_secrets(url) == []
    assert mask_url(url + "?password=x") == url + "?password=***"  # not re-encoded


def run(args, tmp_path, env=(), timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env=script_env(tmp_path / "_cache", dict(env)), timeout=timeout,
                          check=False)


def script(name):
    return str(REPO / "scripts" / name)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, cifar_tiny_dir):
    """A coarse study in SQLite, opened through a URL that carries ?password= (SQLite ignores
    it, with a warning): every output of the run is collected."""
    base = tmp_path_factory.mktemp("secrets")
    url = f"sqlite:///{base / 's.db'}?password={SECRET}"
    proc = run([script("search.py"), "coarse", "--campaign", "s", "--storage", url, "--n-trials",
                "2", "--data-dir", str(cifar_tiny_dir.batches), *TINY, "--json"], base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"base": base, "url": url, "proc": proc}


def test_json_and_log_hide_a_query_password(campaign):
    proc = campaign["proc"]
    assert SECRET not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["storage"].endswith("?password=***")


def test_dashboard_page_hides_a_query_password(campaign):
    page = campaign["base"] / "d.html"
    proc = run([script("dashboard.py"), "--campaign", "s", "--storage", campaign["url"],
                "--out", str(page), "--json"], campaign["base"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SECRET not in page.read_text(encoding="utf-8") + proc.stdout + proc.stderr
    assert "password=***" in page.read_text(encoding="utf-8")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_banner_hides_a_query_password(campaign):
    proc = subprocess.Popen([sys.executable, script("dashboard.py"), "--serve", "--port",
                             str(free_port()), "--storage", campaign["url"]], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env(campaign["base"] / "_cache"))
    try:
        banner = proc.stdout.readline()  # printed before the server starts
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert "optuna-dashboard on http://127.0.0.1" in banner, err[-2000:]
    assert SECRET not in banner + err and "password=***" in banner


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/db?password={SECRET}",  # nothing listens: refused
    f"postgresql+psycopg://u:{SECRET}@127.0.0.1:notaport/db?password={SECRET}",
    f"postgres ql://u:{SECRET}@x/db",
])
def test_errors_hide_the_password(url, tmp_path):
    proc = run([script("search.py"), "status", "--storage", url, "--json"], tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_storage_comes_from_the_environment(campaign):
    proc = run([script("search.py"), "status", "--campaign", "s", "--json"], campaign["base"],
               env={"OPTUNA_STORAGE": campaign["url"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s["name"] for s in json.loads(proc.stdout)["studies"]] == ["s-coarse"]
    assert SECRET not in proc.stdout + proc.stderr


def test_the_flag_wins_over_the_environment(campaign, tmp_path):
    env = {"OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"}
    proc = run([script("search.py"), "status", "--campaign", "s", "--storage", campaign["url"],
                "--json"], campaign["base"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run([script("search.py"), "status", "--campaign", "s", "--json"], campaign["base"],
               env=env)
    assert proc.returncode == 2 and "nowhere" in proc.stderr  # without the flag: the environment


def test_a_password_in_the_environment_stays_out_of_the_process_list(campaign):
    proc = subprocess.Popen([sys.executable, script("dashboard.py"), "--serve", "--port",
                             str(free_port())], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=script_env(campaign["base"] / "_cache",
                                           {"OPTUNA_STORAGE": campaign["url"]}))
    try:
        banner = proc.stdout.readline()  # served from the environment's storage
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert "s.db?password=***" in banner
    assert SECRET not in cmdline and "dashboard.py" in cmdline

"""The project as a user installs it: `pip install <clone>` (not editable) into a fresh venv, then
`clr-search` from a folder of the user's own that holds a `model.py` and a `search/` package.

For speed the fresh venv gets the project only (--no-deps); its dependencies
come from this test's environment through a .pth file. That file adds the folder to sys.path but
does not run the .pth files inside it, so an editable install of this checkout there stays
invisible: every import of clr_lambda_search is checked to come from the fresh venv.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import faultlib as fl

pytestmark = pytest.mark.integration

# A user's own modules, named like the project's source folders: imported, they say so loudly.
SHADOW = "raise SystemExit('the user\\'s {} was imported instead of clr_lambda_search\\'s')\n"


def run(args, cwd, env, timeout=120):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def purelib(python):
    return Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd="/", env=None).stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, its site-packages, the clone): the clone of this repository pip-installed into a
    fresh venv."""
    tmp = tmp_path_factory.mktemp("install")
    clone, venv = tmp / "clone", tmp / "venv"
    run(["git", "clone", "-q", "--no-hardlinks", fl.REPO, clone], cwd=tmp, env=None)
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=None)
    python = venv / "bin" / "python"
    site = purelib(python)
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", clone],
        cwd=tmp, env=None, timeout=300)
    return venv, site, clone


@pytest.fixture
def user_folder(tmp_path):
    """An empty folder of the user's, holding a model.py and a search/ package."""
    folder = tmp_path / "user"
    (folder / "search").mkdir(parents=True)
    (folder / "model.py").write_text(SHADOW.format("model.py"))
    (folder / "search" / "__init__.py").write_text(SHADOW.format("search/"))
    return folder


def user_env(tmp_path):
    """A user's environment: no PYTHONPATH (this test's import path), no $CIFAR10_*."""
    env = fl.script_env(tmp_path)
    env.pop("PYTHONPATH", None)
    env.pop("OPTUNA_STORAGE", None)
    return env


def test_a_non_editable_install_leaves_the_clone_clean(installed):
    _, _, clone = installed
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, env=None)
    assert status.stdout == "", f"pip install left files git does not ignore:\n{status.stdout}"


def test_the_installed_package_is_imported_not_the_checkout(installed, user_folder, tmp_path):
    venv, site, _ = installed
    code = ("import clr_lambda_search, clr_lambda_search.model.train as m, "
            "clr_lambda_search.search.campaign as c, json; "
            "print(json.dumps([clr_lambda_search.__file__, m.__file__, c.__file__, "
            "clr_lambda_search.__version__, sorted(c.shipped())]))")
    files = json.loads(run([venv / "bin" / "python", "-c", code], user_folder,
                           user_env(tmp_path)).stdout)
    *paths, version, shipped = files
    for path in paths:
        assert Path(path).resolve().is_relative_to(site.resolve()), f"{path} is not in {site}"
    assert version != "0+unknown"  # the installed distribution's metadata is found
    assert {"dd2424", "extended"} <= set(shipped), shipped  # the campaigns shipped in the wheel


@pytest.mark.parametrize("command", [["clr-search"], ["python", "-m", "clr_lambda_search"]])
def test_help_from_the_users_folder(installed, user_folder, tmp_path, command):
    venv, _, _ = installed
    out = run([venv / "bin" / command[0], *command[1:], "--help"], user_folder,
              user_env(tmp_path)).stdout
    assert "pipeline" in out and "dashboard" in out, out
    out = run([venv / "bin" / command[0], *command[1:], "pipeline", "--help"], user_folder,
              user_env(tmp_path)).stdout
    assert "dd2424" in out and "extended" in out, out  # the shipped campaigns are found


@pytest.mark.timeout(300)
def test_the_pipeline_runs_to_the_end_from_the_users_folder(installed, user_folder, tmp_path,
                                                          cifar_tiny_dir):
    venv, _, _ = installed
    tiny = ["phases.coarse.n_trials=2", "phases.fine.n_trials=2", "phases.fine.narrow.top_k=2",
            "phases.confirm.top_k=2", "phases.confirm.seeds=2",
            "search.n_s=20", "search.cycles=1", "final.n_s=20", "final.cycles=1", "final.seeds=1"]
    proc = run([venv / "bin" / "clr-search", "pipeline", "--data-dir", cifar_tiny_dir.batches,
                "--n-val", 20, "--workers", 1, "--pruner", "none", "--json",
                *[a for s in tiny for a in ("--set", s)]], user_folder, user_env(tmp_path),
               timeout=280)
    summary = json.loads(proc.stdout)
    assert [p["study"] for p in summary["phases"]] == [
        "cifar10-coarse", "cifar10-fine", "cifar10-confirm"], summary["phases"]
    assert len(summary["final"]["test_acc"]) == 1, summary["final"]
    studies = user_folder / "studies"
    assert (studies / "studies.db").is_file()  # the default storage, in the user's folder
    assert any(studies.rglob("metrics.json")) and any(studies.rglob("dashboard.html"))
    assert os.listdir(user_folder / "search") == ["__init__.py"]  # never imported

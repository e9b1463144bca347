"""The scripts in a hostile environment (issue 15): a full disk, a read-only cache or HOME, and
results that are not finite. Each runs a script as a user would, on the tiny CIFAR-10.

A full disk is a 64 kB tmpfs where root may mount one (CI); elsewhere the file size limit
(RLIMIT_FSIZE: EFBIG at the write, the same code path as ENOSPC) stands in for it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envlib import _mount_tmpfs, _umount, limited, read_only

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--n-val", "20", "--n-s", "5", "--cycles", "1", "--m", "8"]


def run(script, args, env, limits=None):
    """The script run as a user would; limits: envlib.limited's keywords."""
    command = limited([sys.executable, REPO / "scripts" / script, *args], **(limits or {}))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def script_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    env.update(extra)
    return env


@pytest.fixture
def small_disk(tmp_path):
    """(folder, limits): a folder on a 64 kB file system, or, where no tmpfs can be mounted, a
    folder and the limits (run's) that cap the size of any file the child writes at 64 kB."""
    folder = tmp_path / "small"
    if _mount_tmpfs(folder, "size=64k,mode=0755"):
        yield folder, None
        _umount(folder)
        return
    yield folder, {"file_size": 64 << 10}


def test_disk_full_at_the_results_is_one_line(cifar_tiny_dir, tmp_path, small_disk):
    folder, limits = small_disk
    cache = tmp_path / "cache"  # warmed first: only the results meet the full disk
    warm = run("gradcheck.py", ["--data-dir", str(cifar_tiny_dir.batches), "--n-val", "20", "-q"],
               script_env(CIFAR10_CACHE=str(cache)))
    assert warm.returncode == 0, warm.stderr
    proc = run("train.py", ["--data-dir", str(cifar_tiny_dir.batches), *TINY_TRAIN, "-q",
                            "--out", str(folder / "run")],
               script_env(CIFAR10_CACHE=str(cache)), limits)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(why in proc.stderr for why in ("disk is full", "file size limit")), proc.stderr
    assert list(folder.iterdir()) == []  # no half-written results folder


def test_a_read_only_array_cache_does_not_stop_a_run(cifar_tiny_dir, tmp_path):
    with read_only(tmp_path / "cache") as cache:
        proc = run("train.py", ["--data-dir", str(cifar_tiny_dir.batches), *TINY_TRAIN, "-q",
                                "--json", "--out", str(tmp_path / "run")],
                   script_env(CIFAR10_CACHE=str(cache)))
    assert proc.returncode == 0, proc.stderr
    assert "cannot cache the normalised arrays" in proc.stderr  # a warning, and on it goes
    assert json.loads(proc.stdout)["steps"] == 10


def test_a_read_only_home_does_not_stop_a_run(cifar_tiny_dir, tmp_path):
    # the array cache defaults to ~/.cache/clr-lambda-search; matplotlib's config goes to HOME too
    with read_only(tmp_path / "home") as home:
        proc = run("train.py", ["--data-dir", str(cifar_tiny_dir.batches), *TINY_TRAIN, "-q",
                                "--json", "--out", str(tmp_path / "run")],
                   {**script_env(HOME=str(home)), "MPLCONFIGDIR": ""})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_gradcheck_json_is_json_when_errors_are_not_finite(cifar_tiny_dir, tmp_path, monkeypatch,
                                                         capsys):
    """A check whose relative errors are nan (an overflowing cost: λ is now bounded, so the nan
    is put into the real report) gives JSON with null, and exit status 1 (a failed check)."""
    from clr_lambda_search.search.cli import gradcheck as cli

    real = cli.gradcheck_report

    def overflowing(*args, **kwargs):
        report = real(*args, **kwargs)
        errors = report["checks"][1]["max_rel_error"]
        errors[next(iter(errors))] = float("nan")
        report["passed"] = False
        return report
    monkeypatch.setattr(cli, "gradcheck_report", overflowing)
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["gradcheck.py", "--data-dir", str(cifar_tiny_dir.batches),
                                     "--n-val", "20", "--json", "-q"])
    assert cli.main() == 1  # a failed check, reported
    out = capsys.readouterr().out
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert report["passed"] is False
    assert None in report["checks"][1]["max_rel_error"].values()  # nan became null


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_at_the_storage_is_one_line(cifar_tiny_dir, tmp_path, workers):
    """The storage's disk fills up during the trials: one line naming it, exit 2 (a worker that
    stops so tells its parent through its exit status)."""
    import shutil

    from clr_lambda_search.search.study import open_storage

    made = tmp_path / "made.db"  # the schema made elsewhere: the small disk fills with trials
    open_storage(f"sqlite:///{made}").engine.dispose()
    folder = tmp_path / "small"
    if not _mount_tmpfs(folder, f"size={made.stat().st_size + (160 << 10)},mode=0755"):
        pytest.skip("root may not mount a tmpfs here: a storage's full disk cannot be made")
    try:
        shutil.copy(made, folder / "s.db")
        proc = run("search.py", ["coarse", "--storage", f"sqlite:///{folder / 's.db'}",
                                 "--data-dir", str(cifar_tiny_dir.batches), "--n-val", "20",
                                 "--n-s", "5", "--cycles", "1", "--n-batch", "20", "--pruner",
                                 "none", "--n-trials", "400", "--workers", workers, "-q"],
                   script_env(CIFAR10_CACHE=str(tmp_path / "cache")))
    finally:
        _umount(folder)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "disk is full" in proc.stderr, proc.stderr[-3000:]

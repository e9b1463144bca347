"""A bug in a script (an unexpected exception, not bad input) is one line naming the file its
traceback was written to, secrets hidden there too, exit status 1: never the exit 2 of bad input."""
import errno
import signal
import tempfile
from pathlib import Path

import pytest

from clr_lambda_search.model.errors import InputError
from clr_lambda_search.search.cli import errors, storage

SECRET = "Zq9xWkV7pJ"
URL = f"postgresql+psycopg://u:{SECRET}@db.example/clr"


@pytest.fixture
def bug_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkstemp writes
    monkeypatch.setattr(storage, "_storage_urls", [URL])  # as if --storage URL was given
    monkeypatch.setattr("sys.argv", ["scripts/search.py", "status", "--storage", URL])
    before = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, before)  # run() installs its handler


def deep_in_the_code():
    raise RuntimeError(f"unexpected state while reading {URL}\nsecond line")


def run_failing(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        errors.run(main)
    return exit_.value.code, capsys.readouterr()


@pytest.mark.parametrize("error", [None, OSError(errno.ECONNRESET, "reset"), KeyError("k")])
def test_a_bug_is_one_line_and_a_traceback_file(bug_dir, capsys, error):
    def main():
        if error is not None:
            raise error
        deep_in_the_code()

    code, out = run_failing(main, capsys)
    assert code == 1 and out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected "), out.err
    assert "a bug" in lines[0] and SECRET not in out.err and "Traceback" not in out.err
    files = list(bug_dir.glob("clr-lambda-search-bug-*.txt"))
    assert len(files) == 1 and str(files[0]) in lines[0]
    text = files[0].read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text and "in main" in text
    assert ("deep_in_the_code" in text and "second line" in text) if error is None else True
    assert SECRET not in text and "u:***@db.example" in text  # in the message and the argv


def test_a_bug_without_a_writable_temp_dir_is_still_one_line(bug_dir, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(bug_dir / "missing"))
    code, out = run_failing(deep_in_the_code, capsys)
    assert code == 1 and len(out.err.splitlines()) == 1, out.err
    assert "could not be written" in out.err and SECRET not in out.err


def test_bad_input_is_still_exit_2_and_writes_no_file(bug_dir, capsys):
    def main():
        raise InputError(f"no such study in {URL}")

    code, out = run_failing(main, capsys)
    assert code == 2 and out.err.startswith("error: no such study") and SECRET not in out.err
    assert list(Path(bug_dir).iterdir()) == []


def test_a_reader_that_leaves_the_pipe_is_no_bug(tmp_path):
    """`clr-search status --json | head`: the command stops quietly (exit 141, like any Unix
    tool whose reader left), with no bug report."""
    import subprocess
    import sys

    code = ("import sys\nfrom clr_lambda_search.search.cli import errors\n"
            "def main():\n    while True:\n        print('x' * 100)\n"
            "errors.run(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()  # the reader leaves
    assert proc.wait(timeout=30) == 128 + signal.SIGPIPE
    err = proc.stderr.read().decode()
    assert "bug" not in err and "Traceback" not in err, err

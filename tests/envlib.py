"""Hostile environments for tests: a full disk, a read-only folder, a memory limit.

A full disk and a read-only file system are real where the tests run as root (as in CI): a
small tmpfs, mounted read-write or read-only, over a folder of the test's own. Where mounting is
not allowed, `full_disk` falls back to a simulated ENOSPC at the write (monkeypatch) and
`read_only` to chmod 555 (which stops a non-root user as a read-only file system would).
"""
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path


def _mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, check=False)
    return proc.returncode == 0


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def full_disk(path, monkeypatch, opens=("builtins.open",), size="64k"):
    """A folder whose file system holds `size` bytes: yields (path, real). Without a tmpfs
    (real = False), writing to a file under path opened by one of the `opens` functions (e.g.
    "tarfile.bltn_open") raises ENOSPC."""
    if _mount_tmpfs(path, f"size={size},mode=0755"):
        try:
            yield path, True
        finally:
            _umount(path)
        return
    for target in opens:
        module, name = target.rsplit(".", 1)
        monkeypatch.setattr(target, _full_opener(path, getattr(__import__(module), name)))
    yield path, False


def _full_opener(path, real_open):
    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not str(os.fspath(file)).startswith(str(path)) \
                or not any(c in mode for c in "wax+"):
            return f

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        f.write = write
        return f
    return full_open


@contextlib.contextmanager
def read_only(path):
    """A folder nobody may write to: a read-only tmpfs (root), else chmod 555. Yields path."""
    if _mount_tmpfs(path, "ro,size=64k"):
        try:
            yield path
        finally:
            _umount(path)
        return
    if os.geteuid() == 0:  # chmod does not stop root; as in test_cli_errors, that cannot be tested
        import pytest
        pytest.skip("root may not mount a tmpfs here, and permissions do not stop root")
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


LAUNCHER = Path(__file__).with_name("limited.py")


def limited(command, memory=None, file_size=None, drop_dac=False):
    """command's argv run under limits (tests/limited.py): an address space of `memory` bytes (a
    regression allocating gigabytes fails with MemoryError instead of swapping the machine),
    files of at most `file_size` bytes, root's file-permission overrides dropped."""
    flags = ([f"--memory={memory}"] if memory else []) + (
        [f"--file-size={file_size}"] if file_size else []) + (["--drop-dac"] if drop_dac else [])
    return [sys.executable, str(LAUNCHER), *flags, "--", *map(str, command)] if flags \
        else list(command)

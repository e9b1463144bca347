"""What a run needs from the machine, checked before it starts: memory, and folders it can write.

A run that cannot fit or cannot save its results should say so in one line before it trains,
not end in a MemoryError or a PermissionError minutes later. The estimates are upper bounds of the
allocations that grow with the settings (params, the step's buffers, an evaluation block, the
history); the data set itself is loaded (and measured by the loader) before they are made.
"""
import errno
import os
import resource
import tempfile
from pathlib import Path

import numpy as np

from clr_lambda_search.model.batch_files import D, K
from clr_lambda_search.model.errors import ConfigError, InputError
from clr_lambda_search.model.step import rounded_rows_bytes

EVAL_BLOCK = 8192      # rows model.train.evaluate works on at a time
RECORD_BYTES = 2048    # one evaluation record of the history (dicts of floats), generously
# OSError numbers that mean "this place cannot take the write", whatever the write was
_WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.EFBIG: "the file size limit is reached"}


def training_bytes(config, n_features, n_classes, n_train):
    """Bytes one training run allocates besides the data (an upper bound): two copies of the
    params (the run's and the one it returns) and one per cycle (the snapshots a final run keeps
    for its ensemble), the step's workspace of n_batch rows (with dropout's 16-bit draws), an
    evaluation block, the epoch's permutation, the history's records and, for bf16 products
    without augmentation, the training rows in bf16."""
    item = np.dtype(config.dtype).itemsize
    m, k = config.m, n_classes
    params = (n_features * m + m + m * k + k) * item
    workspace = config.n_batch * ((n_features + 2 * m + k) * item + 2 * m)
    evaluation = EVAL_BLOCK * (2 * m * item + 3 * k * 8)
    history = (config.cycles * config.evals_per_cycle + 1) * RECORD_BYTES
    rows = 0  # bf16 products without augmentation: the training rows in bf16 (model.step)
    if config.precision != "fp32" and not config.augment:
        rows = rounded_rows_bytes((n_train, n_features)) or 0
    return (2 + config.cycles) * params + workspace + evaluation + 8 * n_train + history + rows


def check_memory(config, n_features=None, n_train=50_000, processes=1):
    """ConfigError when `processes` runs of config need more memory than is available. The
    defaults are CIFAR-10's, so that scripts check before they load the data (and log)."""
    need = processes * training_bytes(config, n_features or D, K, n_train)
    have = available_memory()
    if have is not None and need > have:
        runs = f"{processes} runs at once" if processes > 1 else "this run"
        raise ConfigError(f"{runs} would need {_size(need)} of memory (m={config.m}, "
                          f"n_batch={config.n_batch}) but {_size(have)} is available; lower --m, "
                          "--n-batch, --cycles or --evals-per-cycle"
                          + (" or --workers" if processes > 1 else ""))


def available_memory():
    """Bytes this process may still allocate: the least of the machine's available memory, the
    cgroup's headroom (containers) and the address-space limit's headroom (ulimit -v); None if
    none of them can be read."""
    limits = [_meminfo_available(), _cgroup_headroom(), _address_space_headroom()]
    limits = [v for v in limits if v is not None]
    return min(limits) if limits else None


def _meminfo_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom(root=Path("/sys/fs/cgroup")):
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _address_space_headroom():
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        return None
    return max(0, soft - size)


def _size(n):
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


# ---- places to write -----------------------------------------------------------------------------

def check_writable(path, what="output folder", flag="--out"):
    """InputError unless a file can be created in path (a folder) or, where path does not exist
    yet, in its nearest existing ancestor (which the run would create it in). The probe is an
    unnamed temporary file: nothing appears in the folder, and a read-only file system, missing
    permissions or a full quota show as they would at the real write."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write the {what} {path}: {write_problem(e)} in {folder}; "
                         f"choose another {flag} or fix the folder") from None


def write_problem(e):
    """What an OSError of a write means for a user ('the disk is full', …), or its own text."""
    return _WRITE_ERRORS.get(e.errno) or e.strerror or str(e)


def is_write_problem(e):
    """Whether an OSError says the place written to cannot take it (full, read-only, denied)."""
    return isinstance(e, OSError) and e.errno in _WRITE_ERRORS

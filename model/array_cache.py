"""The normalised-array cache of model.dataset.

Unpickling and normalising the full set takes seconds, and every script run and every worker
process would pay it. So the normalised splits are written once as .npy files to
<cache dir>/arrays/<key>/ and later loads memory-map them read-only: a load then takes a fraction
of a second, and all processes share one copy of the pages. The key covers the batch folder's path,
its files' sizes, mtimes and ctimes, n_val, the dtype and the cache format, so a changed data set
is read afresh. An entry is 0.89 GB in float32 (1.6 GB in float64), of which 0.15 GB are the training
pixels; delete the folder to reclaim it. What is read from the cache is checked like the batches
(shapes, dtypes, labels in [0, K)): a damaged or edited entry is rebuilt, never trained on.
"""
import hashlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from clr_lambda_search.model.batch_files import D, K, TEST_FILE, TRAIN_FILES

log = logging.getLogger(__name__)
ARRAYS_DIR = "arrays"  # the normalised-array cache, under the cache dir
ARRAYS_FORMAT = 5      # bump when the cached files or the normalisation change (2: exact variance,
                       # 3: normalised in the target dtype, train pixels kept for the step's gather,
                       # 4: the content fingerprint, 5: every split's pixels, no fingerprint file:
                       # the loader computes it from the pixels it uses)
SPLITS = ("train", "val", "test")


def entry(cache_dir, folder, n_val, dtype):
    """(the entry folder, its spec) of the arrays of folder's batches with n_val and dtype."""
    spec = _cache_spec(folder, n_val, dtype)
    return Path(cache_dir) / ARRAYS_DIR / _cache_key(spec), spec


def _cache_spec(folder, n_val, dtype):
    """What the cached arrays depend on. ctime is there because tar restores a file's mtime, but
    a rewritten file always gets a new ctime."""
    files = []
    for name in TRAIN_FILES + [TEST_FILE]:
        st = (folder / name).stat()
        files.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return {"format": ARRAYS_FORMAT, "folder": str(folder.resolve()), "files": files,
            "n_val": n_val, "dtype": dtype.name}


_CACHE_ENTRY = re.compile(r"[0-9a-f]{20}")  # what _cache_key names an entry


def _cache_key(spec):
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def read(entry, n_val, dtype):
    """The arrays cached in entry (the training X memory-mapped read-only), or None if absent or
    unusable: {"splits": {name: (X, y)}, "pixels": {name: raw uint8}, "scale", "shift"}; the X
    of val and test is None (the loader normalises their pixels: what is validated on is what
    the fingerprint covers)."""
    try:
        if not entry.is_dir():
            return None
        files = [entry / "train_X.npy", entry / "scale.npy", entry / "shift.npy"] + [
            entry / f"{n}_{a}.npy" for n in SPLITS for a in ("y", "pixels")]
        if not all(f.is_file() for f in files):  # missing, or a FIFO or folder: never opened
            raise ValueError("a file is missing or not a regular file")
        splits = {name: (_load_mapped(entry / "train_X.npy") if name == "train" else None,
                         np.load(entry / f"{name}_y.npy", allow_pickle=False)) for name in SPLITS}
        pixels = {name: _load_mapped(entry / f"{name}_pixels.npy") for name in SPLITS}
        scale, shift = (np.load(entry / f"{k}.npy", allow_pickle=False) for k in ("scale", "shift"))
    except (OSError, ValueError, EOFError) as e:  # EOFError: np.load of an empty file
        log.warning("array cache %s is unreadable (%s); rebuilding it", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if not (_cached_arrays_ok(splits, pixels, scale, shift, dtype)
            and len(splits["val"][1]) == n_val):
        log.warning("array cache %s does not hold the expected arrays; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return {"splits": splits, "pixels": pixels, "scale": scale, "shift": shift}


def _cached_arrays_ok(splits, pixels, scale, shift, dtype):
    """Whether arrays read from the cache are what the loader writes: the step's kernels index
    with the labels and the normaliser without bounds checks, so an edited or damaged file must
    not reach them (an out-of-range label would read or write outside its buffers)."""
    for name, (X, y) in splits.items():
        raw = pixels[name]
        if not (y.dtype == np.int64 and y.ndim == 1 and len(y) > 0 and 0 <= y.min()
                and y.max() < K and raw.dtype == np.uint8 and raw.shape == (len(y), D)
                and raw.flags["C_CONTIGUOUS"]):
            return False
        if X is not None and not (X.dtype == dtype and X.shape == (len(y), D)
                                  and X.flags["C_CONTIGUOUS"]):
            return False
    return (scale.dtype == shift.dtype == dtype and scale.shape == shift.shape == (D,)
            and bool(np.isfinite(scale).all() and np.isfinite(shift).all()))


def _load_mapped(path):
    return np.asarray(np.load(path, mmap_mode="r"))


def write(entry, spec, arrays):
    """Store arrays (as read() returns them) in entry; False if they cannot be stored.

    The files are written to a temporary folder renamed into place, so a reader never sees a
    partial entry; when two processes race, the first rename wins and the other is discarded.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    except OSError as e:
        log.warning("cannot cache the normalised arrays in %s (%s)", entry.parent, e)
        return False
    try:
        np.save(tmp / "train_X.npy", arrays["splits"]["train"][0])
        for name, (_, y) in arrays["splits"].items():
            np.save(tmp / f"{name}_y.npy", y)
            np.save(tmp / f"{name}_pixels.npy", arrays["pixels"][name])
        for name in ("scale", "shift"):
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        try:
            tmp.replace(entry)
        except OSError:
            if not entry.is_dir():
                raise
    except OSError as e:
        log.warning("cannot cache the normalised arrays in %s (%s)", entry, e)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_stale(entry, spec)
    return True


def _drop_stale(entry, spec):
    """Delete the other entries that can no longer be hit: those of the same folder, n_val and
    dtype (their batch files changed) and those whose folder is gone (e.g. a temporary copy)."""
    same = ("folder", "n_val", "dtype")
    for other in entry.parent.glob("*/spec.json"):
        # only entries of ours: $CIFAR10_CACHE may be a folder that holds other things too
        if other.parent == entry or not _CACHE_ENTRY.fullmatch(other.parent.name):
            continue
        try:
            old = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(old, dict) or not {"format", "files", *same} <= old.keys():
            continue
        if all(old.get(k) == spec[k] for k in same) or not Path(old.get("folder", "")).is_dir():
            log.info("deleting the stale array cache %s", other.parent)
            shutil.rmtree(other.parent, ignore_errors=True)

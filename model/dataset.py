"""CIFAR-10 as a Dataset: loaded (from the array cache when it holds it), split and normalised.

Split: the training batches data_batch_1..5 are concatenated in file order and the *last* n_val
images (by default the last 1,000 of data_batch_5) are the validation set; test = test_batch. The
split does not depend on any seed, so every trial and every seed is validated on the same images.
Normalisation: pixels / 255, then per dimension (x − mean) / std with the mean and std of the
training split only; a dimension with std 0 is divided by 1 instead (no NaN or inf). It is computed
as x·scale + shift in the target dtype (two roundings), the formula model.step applies to a batch
of the training pixels, which the train split keeps beside its normalised X.
Fingerprint: a digest of the content (the pixels and labels of every image, and where the split
falls), not of the path: the same data set copied elsewhere has the same fingerprint, one changed
pixel, label or n_val another. A study records it so that a resumed search is validated on the
same images (search/).
"""
import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np

from clr_lambda_search.model import array_cache
from clr_lambda_search.model.batch_files import TEST_FILE, TRAIN_FILES, load_batch
from clr_lambda_search.model.download import default_cache_dir, resolve_batches_dir
from clr_lambda_search.model.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Pixels:
    """Raw pixels and the per-dimension affine map that normalises them: X = raw·scale + shift."""
    raw: np.ndarray    # (N, D) uint8, the rows of the split's X
    scale: np.ndarray  # (D,) in X's dtype
    shift: np.ndarray  # (D,) in X's dtype


@dataclasses.dataclass(frozen=True)
class Split:
    X: np.ndarray  # (N, D), samples in rows, C-contiguous
    y: np.ndarray  # (N,), int64 labels
    # every split keeps its pixels: the step gathers a training batch from them, a quarter of
    # the bytes of X, and normalises it on the fly (model.step) into exactly X's rows; the
    # fingerprint is computed from them
    pixels: "Pixels | None" = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    source: str  # the folder the batches were read from
    fingerprint: "str | None" = None  # of the content, set by the loader (see fingerprint())


def load_cifar10(source=None, n_val=1000, dtype="float32", cache_dir=None, cache=True):
    """Load, split and normalise CIFAR-10 -> Dataset (see the module docstring for the rules).

    source and cache_dir: see model.download.resolve_batches_dir. cache: read and write the normalised-array
    cache (model.array_cache; then the returned X arrays are read-only memory maps); False always rebuilds in memory.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = resolve_batches_dir(source, cache_dir)
    missing = [f for f in TRAIN_FILES + [TEST_FILE] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; re-download or rebuild the data set")
    dt = np.dtype(dtype)
    if not cache:
        return build_dataset(folder, n_val, dt)
    entry, spec = array_cache.entry(cache_dir, folder, n_val, dt)
    arrays = array_cache.read(entry, n_val, dt)
    if arrays is not None:
        log.info("CIFAR-10 from %s (normalised arrays cached in %s)", folder, entry)
        return _from_arrays(arrays, folder, n_val)
    data = build_dataset(folder, n_val, dt)
    if array_cache.write(entry, spec, _to_arrays(data)):
        # the memory maps from the cache instead: pages shared with every later process
        arrays = array_cache.read(entry, n_val, dt)
    return data if arrays is None else _from_arrays(arrays, folder, n_val)


def _to_arrays(data):
    """A Dataset as array_cache stores it."""
    pixels = data.train.pixels
    return {"splits": {name: (getattr(data, name).X, getattr(data, name).y) for name in SPLITS},
            "pixels": {name: getattr(data, name).pixels.raw for name in SPLITS},
            "scale": pixels.scale, "shift": pixels.shift}


def _from_arrays(arrays, folder, n_val):
    """The Dataset of cached arrays. Val and test are normalised from their pixels here, and the
    fingerprint is computed from the pixels and labels used (not read from the cache): an entry
    whose labels or pixels were changed is another data set to the studies."""
    scale, shift = arrays["scale"], arrays["shift"]
    splits = {}
    for name in SPLITS:
        X, y = arrays["splits"][name]
        raw = arrays["pixels"][name]
        splits[name] = Split(normalise(raw, scale, shift) if X is None else X, y,
                             Pixels(raw, scale, shift))
    train, val, test = (arrays["pixels"][n] for n in SPLITS)
    labels = [arrays["splits"][n][1] for n in SPLITS]
    digest = content_fingerprint((train, val), tuple(labels[:2]), test, labels[2], n_val)
    return Dataset(**splits, source=str(folder), fingerprint=digest)


def build_dataset(folder, n_val, dtype):
    """Unpickle the batches of folder, split and normalise them -> Dataset (in memory)."""
    parts = [load_batch(folder / f) for f in TRAIN_FILES]
    X_all = np.concatenate([p[0] for p in parts])
    y_all = np.concatenate([p[1] for p in parts])
    if not 0 < n_val < len(y_all):
        raise DataError(f"n_val = {n_val} must lie between 1 and {len(y_all) - 1}")
    X_test, y_test = load_batch(folder / TEST_FILE)
    log.info("CIFAR-10 from %s: %d train, %d val, %d test", folder, len(y_all) - n_val, n_val,
             len(y_test))
    return split_and_normalise(X_all, y_all, X_test, y_test, n_val, dtype, str(folder))


def split_and_normalise(X_all, y_all, X_test, y_test, n_val, dtype, source):
    """Dataset of uint8 pixels: the last n_val of X_all validate, the rest train; all three
    normalised with the training statistics, the train split keeping its pixels."""
    n_train = len(y_all) - n_val
    scale, shift = normaliser(*train_stats(X_all[:n_train]), dtype)
    train_raw = np.ascontiguousarray(X_all[:n_train])
    return Dataset(
        train=Split(normalise(train_raw, scale, shift), y_all[:n_train],
                    Pixels(train_raw, scale, shift)),
        val=Split(normalise(X_all[n_train:], scale, shift), y_all[n_train:],
                  Pixels(np.ascontiguousarray(X_all[n_train:]), scale, shift)),
        test=Split(normalise(X_test, scale, shift), y_test,
                   Pixels(np.ascontiguousarray(X_test), scale, shift)),
        source=source,
        fingerprint=content_fingerprint(X_all, y_all, X_test, y_test, n_val),
    )


_FINGERPRINT_VERSION = b"clr-lambda-search data fingerprint 1"


def content_fingerprint(X_all, y_all, X_test, y_test, n_val):
    """sha256 (hex) of the uint8 pixels and the labels of the training batches and of the test
    batch, and of n_val (where the split falls): the content, not the path. 0.1 s for 60k images.
    An argument may be a tuple of arrays (train, val): hashed as their concatenation."""
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    for a in (X_all, y_all, X_test, y_test):
        parts = [np.ascontiguousarray(x) for x in (a if isinstance(a, tuple) else (a,))]
        shape = (sum(len(x) for x in parts),) + parts[0].shape[1:]
        h.update(f"|{parts[0].dtype.str}{shape}|".encode())
        for x in parts:  # a tuple of parts hashes as their concatenation, without a copy
            h.update(x)
    h.update(f"|n_val={n_val}".encode())
    return h.hexdigest()


def fingerprint(dataset):
    """The content fingerprint of a Dataset (see the module docstring): the one its loader
    recorded, or, for one built in memory from normalised arrays, a digest of those."""
    if dataset.fingerprint:
        return dataset.fingerprint
    h = hashlib.sha256(_FINGERPRINT_VERSION + b" (normalised arrays)")
    for split in SPLITS:
        for a in (getattr(dataset, split).X, getattr(dataset, split).y):
            a = np.ascontiguousarray(a)
            h.update(f"|{split}{a.dtype.str}{a.shape}|".encode())
            h.update(a)
    return h.hexdigest()


def train_stats(X_uint8, block=1024):
    """Per-dimension mean and std (float64) of pixels / 255; a zero std becomes 1.

    The sums of pixels and of their squares are exact integers, so a constant pixel has a
    variance of exactly 0 (the float formula E[x²] − E[x]² leaves ~1e-8 there and would skip the
    rule, dividing by a round-off).
    """
    n = len(X_uint8)
    s = np.zeros(X_uint8.shape[1], dtype=np.int64)
    s2 = np.zeros(X_uint8.shape[1], dtype=np.int64)
    for start in range(0, n, block):
        xb = X_uint8[start:start + block]
        s += xb.sum(axis=0, dtype=np.int64)
        s2 += np.square(xb, dtype=np.uint16).sum(axis=0, dtype=np.int64)  # 255² fits in uint16
    var_num = n * s2 - s * s  # n²·255²·var, exact (< 2^63 for any CIFAR-sized n)
    mean = s / (255.0 * n)
    std = np.sqrt(var_num) / (255.0 * n)
    std[var_num == 0] = 1.0  # a constant pixel: centre it, don't divide by zero
    return mean, std


def normaliser(mean, std, dtype):
    """(scale, shift) in dtype such that (x / 255 − mean) / std = x·scale + shift."""
    return (1.0 / (255.0 * std)).astype(dtype), (-mean / std).astype(dtype)


def normalise(X_uint8, scale, shift, block=256):
    """X·scale + shift in the dtype of scale, over row blocks that stay in cache.

    Two roundings in that dtype (the product, then the sum), as model.step's gather computes it,
    so that a normalised batch of pixels equals the same rows of this array bit for bit.
    """
    out = np.empty(X_uint8.shape, dtype=scale.dtype)
    for start in range(0, len(X_uint8), block):
        rows = out[start:start + block]
        np.multiply(X_uint8[start:start + block], scale, out=rows)
        rows += shift
    return out

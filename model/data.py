"""CIFAR-10: find or download the python batches, unpickle them safely, split and normalise.

Split: the training batches data_batch_1..5 are concatenated in file order and the *last* n_val
images (by default the last 1,000 of data_batch_5) are the validation set; test = test_batch. The
split does not depend on any seed, so every trial and every seed is validated on the same images.
Normalisation: pixels / 255, then per dimension (x − mean) / std with the mean and std of the
training split only; a dimension with std 0 is divided by 1 instead (no NaN or inf). It is computed
as x·scale + shift in the target dtype (two roundings), the formula model.step applies to a batch
of the training pixels, which the train split keeps beside its normalised X.
Array cache: unpickling and normalising the full set takes seconds, and every script run and every
worker process would pay it. So the normalised splits are written once as .npy files to
<cache dir>/arrays/<key>/ and later loads memory-map them read-only: a load then takes a fraction
of a second, and all processes share one copy of the pages. The key covers the batch folder's path,
its files' sizes, mtimes and ctimes, n_val, the dtype and the cache format, so a changed data set
is read afresh. An entry is 0.89 GB in float32 (1.6 GB in float64), of which 0.15 GB are the training
pixels; delete the folder to reclaim it. What is read from the cache is checked like the batches
(shapes, dtypes, labels in [0, K)): a damaged or edited entry is rebuilt, never trained on.
Fingerprint: a digest of the content (the pixels and labels of every image, and where the split
falls), not of the path: the same data set copied elsewhere has the same fingerprint, one changed
pixel, label or n_val another. A study records it so that a resumed search is validated on the
same images (search/).
"""
import dataclasses
import errno
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from model.errors import DataError
from model.resources import is_write_problem, write_problem

log = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
D, K = 3072, 10
ENV_DIR, ENV_URL, ENV_MD5, ENV_CACHE = "CIFAR10_DIR", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_CACHE"
ARRAYS_DIR = "arrays"  # the normalised-array cache, under the cache dir
ARRAYS_FORMAT = 4      # bump when the cached files or the normalisation change (2: exact variance,
                       # 3: normalised in the target dtype, train pixels kept for the step's gather,
                       # 4: the content fingerprint)
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
    # the training split keeps its pixels: the step gathers a batch from them, a quarter of the
    # bytes of X, and normalises it on the fly (model.step) into exactly X's rows
    pixels: "Pixels | None" = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    source: str  # the folder the batches were read from
    fingerprint: "str | None" = None  # of the content, set by the loader (see fingerprint())


# ---- safe unpickling ----------------------------------------------------------------------------

# What a CIFAR-10 batch pickle may reference: numpy arrays rebuilt from bytes (numpy 1 and 2 module
# names, protocols 2-5), and the codec Python 3 uses for bytes in protocol-2 pickles. Nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits _ALLOWED_GLOBALS only, and no array larger than max_bytes (the file's size).

    numpy rebuilds an array from a declared shape and dtype, allocating it, and only then fills it
    from the pickle's bytes: a 150-byte file could declare 3 GB. A genuine array's bytes are in
    the file, so the declared size is checked against the file's before anything is allocated.
    """

    def __init__(self, file, max_bytes, **kwargs):
        super().__init__(file, **kwargs)
        self.max_bytes = max_bytes

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return self._reconstruct(found)
        if name == "scalar":
            return lambda dtype, *args: found(self._checked(dtype, ()), *args)
        if name == "ndarray":  # only ever _reconstruct's first argument, never called itself
            return _ARRAY_TYPE
        return found

    def _reconstruct(self, reconstruct):
        def checked(subtype, shape, dtype):
            if subtype is not _ARRAY_TYPE:
                raise pickle.UnpicklingError("an array of another type than numpy.ndarray")
            return reconstruct(np.ndarray, shape, self._checked(dtype, shape))
        return checked

    def _checked(self, dtype, shape):
        """np.dtype(dtype), once shape × itemsize fits in max_bytes (UnpicklingError if not)."""
        try:
            dt = np.dtype(dtype)
            dims = [shape] if isinstance(shape, int) else [int(n) for n in shape]
        except (TypeError, ValueError) as e:
            raise pickle.UnpicklingError(f"bad array declaration ({e})") from None
        if dt.hasobject or any(n < 0 for n in dims):
            raise pickle.UnpicklingError("an array of objects or of a negative size")
        size = math.prod(dims) * dt.itemsize
        if size > self.max_bytes:
            raise pickle.UnpicklingError(f"it declares a {size:,}-byte array in a "
                                         f"{self.max_bytes:,}-byte file")
        return dt


class _ArrayType:
    """What the unpickler hands out for numpy.ndarray: a token _reconstruct accepts, not a type
    that a pickle could call to allocate an array of any shape."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refused call of numpy.ndarray")


_ARRAY_TYPE = _ArrayType()


def load_batch(path):
    """Unpickle one CIFAR-10 batch file -> (X uint8 (N, 3072), y int64 (N,)).

    Only numpy array reconstruction is admitted: a pickle that would import or call anything else
    is refused before any of it runs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            unpickler = _BatchUnpickler(f, max_bytes=os.fstat(f.fileno()).st_size, encoding="bytes")
            return _batch_arrays(unpickler.load(), path)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused global"):
            raise DataError(f"{path} is not a CIFAR-10 batch: it asks to run code ({e}); "
                            "delete it and use the official data") from None
        raise DataError(f"{path} is corrupt ({e}); re-download or rebuild the data set") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
            MemoryError) as e:  # what a damaged byte stream makes the unpickler raise
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}); "
                        "re-download or rebuild the data set") from None


def _batch_arrays(batch, path):
    def bad(why):
        return DataError(f"{path} is not a CIFAR-10 batch ({why}); re-download or rebuild the data set")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise bad("no data/labels entries")
    X, y = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(X, np.ndarray) or X.dtype != np.uint8 or X.ndim != 2 or X.shape[1] != D:
        raise bad("data is not a uint8 array of 3072 columns")
    if (not np.issubdtype(y.dtype, np.integer) or y.shape != (X.shape[0],) or y.size == 0
            or y.min() < 0 or y.max() >= K):
        raise bad("labels do not match the data")
    return X, y.astype(np.int64)


# ---- finding, downloading and extracting ---------------------------------------------------------

def default_cache_dir():
    """$CIFAR10_CACHE, else ~/.cache/clr-lambda-search."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "clr-lambda-search")


def resolve_batches_dir(source=None, cache_dir=None):
    """The folder holding data_batch_1..5 and test_batch.

    source: a cifar-10-batches-py folder, a folder containing one (or the archive), a
    cifar-10-python.tar.gz, or None: then $CIFAR10_DIR, else the official archive is downloaded
    (from $CIFAR10_URL if set, checked against $CIFAR10_MD5 if set) into the cache.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    source = source or os.environ.get(ENV_DIR)
    if not source:
        return _download_and_extract(cache_dir)
    try:
        return _local_batches_dir(Path(source).expanduser(), cache_dir)
    except PermissionError as e:
        raise DataError(f"cannot read {e.filename or source}: permission denied; check the path "
                        "and its permissions") from None


def _local_batches_dir(path, cache_dir):
    _check_exists(path)
    if path.is_file():
        return extract_archive(path, cache_dir, expected_md5=os.environ.get(ENV_MD5))
    for candidate in (path, path / BATCHES_DIR):
        if (candidate / TRAIN_FILES[0]).is_file():
            return candidate
    if (path / ARCHIVE).is_file():
        return extract_archive(path / ARCHIVE, cache_dir, expected_md5=os.environ.get(ENV_MD5))
    raise DataError(f"no CIFAR-10 batches in {path} (expected {BATCHES_DIR}/data_batch_1..5 and "
                    f"test_batch, or {ARCHIVE}); point --data-dir at a local copy or leave it unset "
                    "to download")


def _check_exists(path):
    """DataError naming why path cannot be reached: missing, a symlink loop, a dangling link."""
    try:
        path.stat()
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"data path {path} is a symlink loop (a link that leads back to "
                            "itself); fix the link or point --data-dir at the real folder") from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
    if path.is_symlink():
        raise DataError(f"data path {path} is a broken symlink (to {os.readlink(path)}, which does "
                        "not exist); fix the link or point --data-dir at the real folder")
    raise DataError(f"data path {path} does not exist; point --data-dir (or ${ENV_DIR}) at a "
                    f"{BATCHES_DIR} folder or {ARCHIVE}")


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_and_extract(cache_dir):
    url = os.environ.get(ENV_URL) or URL
    md5 = os.environ.get(ENV_MD5) or MD5
    done = cache_dir / md5 / BATCHES_DIR
    if (done / TRAIN_FILES[0]).is_file():
        return done
    archive = download(url, cache_dir / ARCHIVE, md5)
    return extract_archive(archive, cache_dir, expected_md5=md5)


def download(url, dest, md5):
    """Fetch url to dest with a progress bar; the file appears only once its MD5 matches."""
    from tqdm import tqdm

    dest = Path(dest)
    if dest.is_file() and file_md5(dest) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=f"downloading {Path(url).name}", leave=False) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    except (OSError, ValueError) as e:
        _unlink_quietly(part)
        if is_write_problem(e):  # the network is fine: the cache folder cannot take the file
            raise DataError(f"cannot download {url} into {dest.parent}: {write_problem(e)}; free "
                            f"space there or set ${ENV_CACHE} to a writable folder with ~0.4 GB "
                            "free") from None
        raise DataError(f"cannot download {url} ({e}); check the network, or set ${ENV_DIR} to a "
                        "local copy") from None
    got = file_md5(part)
    if got != md5:
        part.unlink()
        raise DataError(f"checksum mismatch for {url}: MD5 {got}, expected {md5}; the file is "
                        f"corrupt or not CIFAR-10 — retry, or set ${ENV_MD5} for a mirror you trust")
    part.replace(dest)
    return dest


def _unlink_quietly(path):
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def extract_archive(archive, cache_dir, expected_md5=None):
    """Safely extract a cifar-10-python.tar.gz into cache_dir/<md5>/ and return its batches folder.

    Verifies expected_md5 first (if given); refuses members with absolute paths, '..' or links, so
    nothing lands outside the target. Extraction goes to a temporary folder renamed at the end.
    """
    archive = Path(archive)
    md5 = file_md5(archive)
    if expected_md5 and md5 != expected_md5:
        raise DataError(f"checksum mismatch for {archive}: MD5 {md5}, expected {expected_md5}; "
                        f"the archive is corrupt or not CIFAR-10 (unset ${ENV_MD5} to skip the check)")
    target = Path(cache_dir) / md5
    if (target / BATCHES_DIR / TRAIN_FILES[0]).is_file():
        return target / BATCHES_DIR
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    except OSError as e:
        raise _cache_write_error(archive, target.parent, e) from None
    try:
        _safe_extract(archive, tmp)
        if not (tmp / BATCHES_DIR / TRAIN_FILES[0]).is_file():
            raise DataError(f"{archive} holds no {BATCHES_DIR}/ folder; it is not the CIFAR-10 "
                            "python archive")
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / BATCHES_DIR


def _safe_extract(archive, dest):
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, archive)
            tar.extractall(dest, members=members, **_extract_filter())
    except OSError as e:
        if is_write_problem(e) and str(getattr(e, "filename", "")) != str(archive):
            raise _cache_write_error(archive, dest.parent, e) from None
        raise DataError(f"{archive} is not a readable tar.gz archive ({e}); re-download it") from None
    except (tarfile.TarError, EOFError, io.UnsupportedOperation) as e:
        raise DataError(f"{archive} is not a readable tar.gz archive ({e}); re-download it") from None


def _cache_write_error(archive, folder, e):
    """The archive is fine: its extraction failed because the cache folder cannot take it."""
    return DataError(f"cannot extract {archive} into {folder}: {write_problem(e)}; free space "
                     f"there or set ${ENV_CACHE} to a writable folder with ~0.2 GB free")


def _check_member(member, archive):
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in Path(name).parts:
        raise DataError(f"{archive} is unsafe: member {name!r} would be written outside the "
                        "target folder; refusing to extract it")
    if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
        raise DataError(f"{archive} is unsafe: member {name!r} is a link or special file; "
                        "refusing to extract it")


def _extract_filter():
    # Python ≥ 3.12 (and patched 3.10/3.11) also enforce the 'data' filter: a second lock.
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


# ---- the data set --------------------------------------------------------------------------------

def load_cifar10(source=None, n_val=1000, dtype="float32", cache_dir=None, cache=True):
    """Load, split and normalise CIFAR-10 -> Dataset (see the module docstring for the rules).

    source and cache_dir: see resolve_batches_dir. cache: read and write the normalised-array
    cache (then the returned X arrays are read-only memory maps); False always rebuilds in memory.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = resolve_batches_dir(source, cache_dir)
    missing = [f for f in TRAIN_FILES + [TEST_FILE] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; re-download or rebuild the data set")
    dt = np.dtype(dtype)
    if not cache:
        return build_dataset(folder, n_val, dt)
    spec = _cache_spec(folder, n_val, dt)
    entry = cache_dir / ARRAYS_DIR / _cache_key(spec)
    data = _read_arrays(entry, folder, n_val, dt)
    if data is None:
        data = build_dataset(folder, n_val, dt)
        data = _write_arrays(entry, data, spec) or data
    return data


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
        val=Split(normalise(X_all[n_train:], scale, shift), y_all[n_train:]),
        test=Split(normalise(X_test, scale, shift), y_test),
        source=source,
        fingerprint=content_fingerprint(X_all, y_all, X_test, y_test, n_val),
    )


_FINGERPRINT_VERSION = b"clr-lambda-search data fingerprint 1"


def content_fingerprint(X_all, y_all, X_test, y_test, n_val):
    """sha256 (hex) of the uint8 pixels and the labels of the training batches and of the test
    batch, and of n_val (where the split falls): the content, not the path. 0.1 s for 60k images."""
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    for a in (X_all, y_all, X_test, y_test):
        a = np.ascontiguousarray(a)
        h.update(f"|{a.dtype.str}{a.shape}|".encode())
        h.update(a)
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


# ---- the normalised-array cache ----------------------------------------------------------------

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


def _read_arrays(entry, folder, n_val, dtype):
    """The Dataset cached in entry, memory-mapped read-only, or None if absent or unusable."""
    try:
        if not entry.is_dir():
            return None
        splits = {name: Split(_load_mapped(entry / f"{name}_X.npy"),
                              np.load(entry / f"{name}_y.npy"))
                  for name in SPLITS}
        pixels = Pixels(_load_mapped(entry / "train_pixels.npy"), np.load(entry / "scale.npy"),
                        np.load(entry / "shift.npy"))
        digest = (entry / "fingerprint").read_text().strip()
    except (OSError, ValueError) as e:
        log.warning("array cache %s is unreadable (%s); rebuilding it", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if not (_cached_arrays_ok(splits, pixels, dtype) and len(splits["val"].y) == n_val
            and len(digest) == 64):
        log.warning("array cache %s does not hold the expected arrays; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    log.info("CIFAR-10 from %s (normalised arrays cached in %s)", folder, entry)
    splits["train"] = dataclasses.replace(splits["train"], pixels=pixels)
    return Dataset(**splits, source=str(folder), fingerprint=digest)


def _cached_arrays_ok(splits, pixels, dtype):
    """Whether arrays read from the cache are what the loader writes: the step's kernels index
    with the labels and the normaliser without bounds checks, so an edited or damaged file must
    not reach them (an out-of-range label would read or write outside its buffers)."""
    for s in splits.values():
        if not (s.X.dtype == dtype and s.X.ndim == 2 and s.X.shape == (len(s.y), D)
                and s.X.flags["C_CONTIGUOUS"] and s.y.dtype == np.int64 and s.y.ndim == 1
                and len(s.y) > 0 and 0 <= s.y.min() and s.y.max() < K):
            return False
    return (pixels.raw.dtype == np.uint8 and pixels.raw.shape == splits["train"].X.shape
            and pixels.raw.flags["C_CONTIGUOUS"]
            and pixels.scale.dtype == pixels.shift.dtype == dtype
            and pixels.scale.shape == pixels.shift.shape == (D,)
            and bool(np.isfinite(pixels.scale).all() and np.isfinite(pixels.shift).all()))


def _load_mapped(path):
    return np.asarray(np.load(path, mmap_mode="r"))


def _write_arrays(entry, data, spec):
    """Store data in entry and return it memory-mapped from there; None if it cannot be stored.

    The files are written to a temporary folder renamed into place, so a reader never sees a
    partial entry; when two processes race, the first rename wins and the other is discarded.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    except OSError as e:
        log.warning("cannot cache the normalised arrays in %s (%s)", entry.parent, e)
        return None
    try:
        for name in SPLITS:
            np.save(tmp / f"{name}_X.npy", getattr(data, name).X)
            np.save(tmp / f"{name}_y.npy", getattr(data, name).y)
        pixels = data.train.pixels
        for name, array in (("train_pixels", pixels.raw), ("scale", pixels.scale),
                            ("shift", pixels.shift)):
            np.save(tmp / f"{name}.npy", array)
        (tmp / "fingerprint").write_text(data.fingerprint + "\n")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        try:
            tmp.replace(entry)
        except OSError:
            if not entry.is_dir():
                raise
    except OSError as e:
        log.warning("cannot cache the normalised arrays in %s (%s)", entry, e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_stale(entry, spec)
    return _read_arrays(entry, Path(data.source), spec["n_val"], np.dtype(spec["dtype"]))


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

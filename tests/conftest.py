"""Shared fixtures: a seeded rng, a tiny synthetic data set and params, and a tiny CIFAR-10 on disk.

The on-disk CIFAR-10 uses the real format (pickled dicts with bytes keys and a uint8 (n, 3072)
`data` array, in a cifar-10-batches-py/ folder and a cifar-10-python.tar.gz archive of it), so the
loader and the scripts read it exactly as they read the official files, in well under a second.
"""
import hashlib
import os
import pickle
import signal
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from clr_lambda_search.model.dataset import Dataset, Split, split_and_normalise
from clr_lambda_search.model.network import init_params
from clr_lambda_search.model.step import IMAGE_D

# The tiny CIFAR-10: 5 train batches + 1 test batch of N_PER_BATCH images each.
N_PER_BATCH = 40
# Two pixels have the same value in every image (std 0): black, whose std comes out exactly 0, and
# mid-grey, whose std the loader computes as ~1e-8 (see test_data.py). They lie outside the first
# 20 dimensions that scripts/gradcheck.py slices: a (near-)zero input column makes the W1 relative
# error meaningless there (both gradients ~0).
CONST_COLS = (2000, 2001)
CONST_VALUES = (0, 128)
# Pickle protocols per file: 2 is what Python 2 wrote (bytes go through _codecs.encode), 4 is
# what make_cifar10.py writes, 5 rebuilds arrays through numpy's _frombuffer.
PROTOCOLS = {"data_batch_1": 2, "data_batch_2": 4, "data_batch_3": 2, "data_batch_4": 4,
             "data_batch_5": 5, "test_batch": 4, "batches.meta": 2}
CIFAR_ENV = ("CIFAR10_DIR", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_CACHE")
# The scripts read their storage from $OPTUNA_STORAGE when no --storage is given: a user's own
# must not reach the scripts the tests run.
os.environ.pop("OPTUNA_STORAGE", None)
# A shell without job control (CI's background job) starts pytest with SIGINT ignored, and a child
# inherits an ignored signal through exec: its Python would never raise KeyboardInterrupt. A handled
# signal is reset to the default by exec, so handling it here gives every child the default. (Not a
# preexec_fn in each Popen: that forks a pytest that may hold gRPC's threads, and gRPC's fork
# handlers then abort the child: "epoll_wait error: Bad file descriptor", exit -6.)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


REPO_STUDIES = Path(__file__).resolve().parents[1] / "studies"


def _studies_listing():
    return {(p.name, p.stat().st_mtime_ns) for p in REPO_STUDIES.iterdir()} \
        if REPO_STUDIES.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def repo_studies_untouched():
    """No test writes the project's own studies/ (the default storage of a script run from the
    repo without --storage: a user's real studies live there). A test that forgets --storage
    fails the session here."""
    before = _studies_listing()
    yield
    changed = sorted(name for name, _ in _studies_listing() ^ before)
    if changed:
        pytest.fail(f"tests wrote the repo's studies/ ({', '.join(changed)}): give every script "
                    "a --storage and --out in tmp_path", pytrace=False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_split(rng, N, D, K, dtype=np.float64):
    """Standardised Gaussian features and uniform random labels covering all K classes."""
    X = rng.standard_normal((N, D)).astype(dtype)
    y = rng.permutation(np.arange(N) % K).astype(np.int64)
    return Split(X, y)


def make_tiny_data():
    """53 train (not a multiple of the batch sizes used in tests), 17 val, 19 test; D=20, K=10."""
    r = np.random.default_rng(1)
    return Dataset(train=make_split(r, 53, 20, 10), val=make_split(r, 17, 20, 10),
                   test=make_split(r, 19, 20, 10), source="synthetic")


@pytest.fixture
def tiny_data():
    return make_tiny_data()


@pytest.fixture
def tiny_params():
    """float64 params for D=20, m=10, K=10 with the default init."""
    return init_params(20, 10, 10, np.random.default_rng(2), dtype=np.float64)


@pytest.fixture
def no_cifar_env(monkeypatch):
    """The loader reads $CIFAR10_*, and `make test` exports CIFAR10_DIR: hide them from a test."""
    for name in CIFAR_ENV:
        monkeypatch.delenv(name, raising=False)


def tiny_batch(rng, n, label):
    """One batch dict in the official layout (bytes keys, uint8 data, list-of-int labels)."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, CONST_COLS] = CONST_VALUES
    labels = [int(v) for v in rng.permutation(np.arange(n) % 10)]  # every class present
    return {b"batch_label": label.encode(), b"labels": labels, b"data": data,
            b"filenames": [f"img_{label}_{i}.png".encode() for i in range(n)]}


def write_pickle(path, obj, protocol):
    raw = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:
        # the official files were written before numpy 2: their arrays name numpy.core.multiarray
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    Path(path).write_bytes(raw)


def make_archive(folder, archive):
    """cifar-10-python.tar.gz holding folder/ under its own name, like the official archive."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_tiny_cifar(root):
    """Write the tiny CIFAR-10 into the folder root (cifar-10-batches-py/ and its archive). The
    batch files are the same bytes on every call (seeded; the archive differs by its file times),
    which tests/data/make_tiny_cifar.py and the storages of tests/data/ rely on.

    Returns a namespace: root (holds both the folder and the archive), batches (the
    cifar-10-batches-py folder), archive, md5 (the archive's), and the raw uint8 arrays
    train_X / train_y (data_batch_1..5 concatenated in file order) and test_X / test_y.
    """
    root = Path(root)
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    r = np.random.default_rng(123)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw[name] = tiny_batch(r, N_PER_BATCH, name)
        write_pickle(batches / name, raw[name], PROTOCOLS[name])
    meta = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer",
                                                   "dog", "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": N_PER_BATCH, b"num_vis": 3072}
    write_pickle(batches / "batches.meta", meta, PROTOCOLS["batches.meta"])
    archive = make_archive(batches, root / "cifar-10-python.tar.gz")
    train = [raw[f"data_batch_{i}"] for i in range(1, 6)]
    return types.SimpleNamespace(
        root=root, batches=batches, archive=archive,
        md5=hashlib.md5(archive.read_bytes()).hexdigest(),
        train_X=np.concatenate([b[b"data"] for b in train]),
        train_y=np.concatenate([b[b"labels"] for b in train]).astype(np.int64),
        test_X=raw["test_batch"][b"data"],
        test_y=np.asarray(raw["test_batch"][b"labels"], dtype=np.int64),
    )


@pytest.fixture(scope="session")
def cifar_tiny_dir(tmp_path_factory):
    """A tiny CIFAR-10 in the real format (write_tiny_cifar). Read-only for tests: copy it before
    changing anything."""
    return write_tiny_cifar(tmp_path_factory.mktemp("cifar_tiny"))


def pixel_data(dtype="float32", n_train=300, seed=0):
    """CIFAR-shaped uint8 pixels with a learnable signal: the label brightens one band of rows."""
    r = np.random.default_rng(seed)
    n = n_train + 60
    y = r.integers(0, 10, n)
    X = r.integers(0, 200, (n, IMAGE_D)).astype(np.uint8)
    for k in range(10):
        X[y == k, k * 300:(k + 1) * 300] += 50
    return split_and_normalise(X[:n_train + 30], y[:n_train + 30], X[n_train + 30:],
                               y[n_train + 30:], 30, dtype, "generated")

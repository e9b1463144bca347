"""CIFAR-10 loading on a tiny copy in the real format: split, normalisation, and hostile input."""
import dataclasses
import http.server
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pooch
import pytest

from conftest import CONST_COLS, CONST_VALUES, N_PER_BATCH, make_archive, tiny_batch, write_pickle
from envlib import full_disk, limited, read_only
from clr_lambda_search.model.batch_files import BATCHES_DIR, D, load_batch
from clr_lambda_search.model.dataset import fingerprint, load_cifar10, normalise, train_stats
from clr_lambda_search.model.download import (ARCHIVE, CHUNK, RETRIES, download, extract_archive, file_md5,
                                              resolve_batches_dir)
from clr_lambda_search.model.errors import DataError
from clr_lambda_search.model.step import gather_batch

pytestmark = pytest.mark.usefixtures("no_cifar_env")  # only what each test sets up is seen

N_VAL = 20
N_TRAIN = 5 * N_PER_BATCH - N_VAL


def copy_batches(cifar, tmp_path):
    dest = tmp_path / "copy" / BATCHES_DIR
    shutil.copytree(cifar.batches, dest)
    return dest


def expected_split(cifar, n_val=N_VAL):
    """The split and normalisation computed independently: float64, two-pass numpy statistics."""
    n_train = len(cifar.train_y) - n_val
    train = cifar.train_X[:n_train] / 255.0
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std < 1e-6] = 1.0

    def norm(X):
        return (X / 255.0 - mean) / std

    return {"train": (norm(cifar.train_X[:n_train]), cifar.train_y[:n_train]),
            "val": (norm(cifar.train_X[n_train:]), cifar.train_y[n_train:]),
            "test": (norm(cifar.test_X), cifar.test_y)}


def non_constant(X):
    return np.delete(X, CONST_COLS, axis=1)


# ---- loading a good data set ---------------------------------------------------------------------

def test_load_from_the_batches_folder(cifar_tiny_dir, tmp_path):
    ds = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype="float64", cache_dir=tmp_path)
    assert ds.source == str(cifar_tiny_dir.batches)
    # sizes: data_batch_1..5 minus the last n_val for validation; test = test_batch
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (N_TRAIN, N_VAL, N_PER_BATCH)
    expected = expected_split(cifar_tiny_dir)
    for name in ("train", "val", "test"):
        split = getattr(ds, name)
        X, y = expected[name]
        assert split.X.shape == (len(y), 3072) and split.X.flags["C_CONTIGUOUS"]
        assert split.y.dtype == np.int64
        np.testing.assert_array_equal(split.y, y)  # labels kept in file order, no shuffling
        # val and test are normalised with the *training* mean and std (float64 round-off only)
        np.testing.assert_allclose(non_constant(split.X), non_constant(X), rtol=0, atol=1e-9,
                                   err_msg=name)


def test_a_second_load_gives_the_same_data(cifar_tiny_dir, tmp_path):
    first = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype="float64", cache_dir=tmp_path)
    second = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype="float64", cache_dir=tmp_path)
    for name in ("train", "val", "test"):  # whatever is cached in between, bit for bit
        np.testing.assert_array_equal(getattr(second, name).X, getattr(first, name).X)
        np.testing.assert_array_equal(getattr(second, name).y, getattr(first, name).y)
    for name in ("raw", "scale", "shift"):  # and the training pixels the step gathers from
        np.testing.assert_array_equal(getattr(second.train.pixels, name),
                                      getattr(first.train.pixels, name))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cached", [True, False])
def test_a_batch_normalised_from_pixels_is_the_rows_of_X(cifar_tiny_dir, tmp_path, dtype, cached):
    """The step's gather from the uint8 pixels yields X[idx] bit for bit (model.step computes
    raw·scale + shift as model.dataset.normalise does), from the cache and from memory."""
    ds = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype=dtype, cache_dir=tmp_path,
                      cache=cached)
    px = ds.train.pixels
    assert px.raw.dtype == np.uint8 and px.raw.shape == ds.train.X.shape
    assert px.scale.dtype == px.shift.dtype == np.dtype(dtype)
    for split in (ds.val, ds.test):  # they keep their pixels too: the fingerprint hashes them
        assert split.pixels.raw.dtype == np.uint8 and split.pixels.raw.shape == split.X.shape
        np.testing.assert_array_equal(normalise(split.pixels.raw, px.scale, px.shift), split.X)
    idx = np.random.default_rng(3).permutation(N_TRAIN)[:37]
    out = np.empty((37, 3072), dtype=dtype)
    gather_batch(ds.train.X, idx, out, px)
    np.testing.assert_array_equal(out, ds.train.X[idx])


def test_a_rewritten_batch_file_is_read_afresh(cifar_tiny_dir, tmp_path):
    folder = copy_batches(cifar_tiny_dir, tmp_path)
    cache = tmp_path / "cache"
    before = load_cifar10(folder, n_val=N_VAL, cache_dir=cache)
    # same protocol and shape, so the same size: only the content (and the file times) change
    new = tiny_batch(np.random.default_rng(99), N_PER_BATCH, "data_batch_2")
    old_size = (folder / "data_batch_2").stat().st_size
    write_pickle(folder / "data_batch_2", new, 4)
    assert (folder / "data_batch_2").stat().st_size == old_size
    after = load_cifar10(folder, n_val=N_VAL, cache_dir=cache)
    rows = slice(N_PER_BATCH, 2 * N_PER_BATCH)
    np.testing.assert_array_equal(after.train.y[rows], new[b"labels"])  # the new labels, not stale
    assert not np.array_equal(after.train.X, before.train.X)


def test_train_split_is_standardised_and_constant_pixel_is_finite(cifar_tiny_dir, tmp_path):
    ds = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype="float64", cache_dir=tmp_path)
    X = ds.train.X
    # every non-constant dimension of the training split has mean 0 and std 1
    np.testing.assert_allclose(non_constant(X).mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(non_constant(X).std(axis=0), 1.0, atol=1e-10)
    # the constant pixels (std 0) give ~0 everywhere, never NaN or inf, in all three splits
    for split in (ds.train, ds.val, ds.test):
        assert np.isfinite(split.X).all()
        assert np.abs(split.X[:, CONST_COLS]).max() < 1e-6
    # the val split really differs from the train distribution's own normalisation: it is *not*
    # re-standardised with its own statistics (which would give exactly mean 0 per dimension)
    assert np.abs(non_constant(ds.val.X).mean(axis=0)).max() > 0.1


def test_constant_pixel_in_the_fixture(cifar_tiny_dir):
    # guards the test above: the fixture really has these constant columns and no other
    assert (cifar_tiny_dir.train_X[:, CONST_COLS] == CONST_VALUES).all()
    assert (non_constant(cifar_tiny_dir.train_X).std(axis=0) > 0).all()


def test_train_stats_std_zero_rule_is_exact():
    # the module docstring: "a dimension with std 0 is divided by 1 instead"
    rng = np.random.default_rng(0)
    for n in (40, 180, 10000):
        X = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        for v in (1, 77, 128, 200, 255):
            X[:, 0] = v
            assert train_stats(X)[1][0] == 1.0, (n, v)


def test_default_dtype_is_float32(cifar_tiny_dir, tmp_path):
    ds = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache_dir=tmp_path)
    assert ds.train.X.dtype == ds.val.X.dtype == ds.test.X.dtype == np.float32
    ref = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype="float64", cache_dir=tmp_path)
    np.testing.assert_allclose(ds.train.X, ref.train.X, rtol=1e-6, atol=1e-6)  # float32 rounding


def test_val_is_the_tail_of_data_batch_5(cifar_tiny_dir, tmp_path):
    ds = load_cifar10(cifar_tiny_dir.batches, n_val=N_PER_BATCH, cache_dir=tmp_path)
    # n_val = one batch: validation is exactly data_batch_5, training is data_batch_1..4
    np.testing.assert_array_equal(ds.val.y, cifar_tiny_dir.train_y[-N_PER_BATCH:])
    np.testing.assert_array_equal(ds.train.y, cifar_tiny_dir.train_y[:-N_PER_BATCH])


@pytest.mark.parametrize("n_val", [0, -1, 5 * N_PER_BATCH, 10**6])
def test_bad_n_val(cifar_tiny_dir, tmp_path, n_val):
    with pytest.raises(DataError, match="n_val"):
        load_cifar10(cifar_tiny_dir.batches, n_val=n_val, cache_dir=tmp_path)


def test_load_from_the_parent_folder(cifar_tiny_dir, tmp_path):
    a = load_cifar10(cifar_tiny_dir.root, n_val=N_VAL, cache_dir=tmp_path)
    b = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache_dir=tmp_path)
    assert a.source == str(cifar_tiny_dir.batches)  # found the batches folder inside
    np.testing.assert_array_equal(a.train.X, b.train.X)


def test_load_from_the_archive(cifar_tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    ds = load_cifar10(cifar_tiny_dir.archive, n_val=N_VAL, cache_dir=cache)
    ref = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache_dir=tmp_path / "unused")
    # extracted under cache/<md5>/ and read back to the very same arrays
    assert ds.source == str(cache / cifar_tiny_dir.md5 / BATCHES_DIR)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(ds, name).X, getattr(ref, name).X)
        np.testing.assert_array_equal(getattr(ds, name).y, getattr(ref, name).y)
    # no temporary extraction folder left behind
    assert cifar_tiny_dir.md5 in {p.name for p in cache.iterdir()}
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    # a second load reuses the extraction
    mtime = (cache / cifar_tiny_dir.md5 / BATCHES_DIR / "data_batch_1").stat().st_mtime_ns
    load_cifar10(cifar_tiny_dir.archive, n_val=N_VAL, cache_dir=cache)
    assert (cache / cifar_tiny_dir.md5 / BATCHES_DIR / "data_batch_1").stat().st_mtime_ns == mtime


def test_load_from_a_folder_holding_only_the_archive(cifar_tiny_dir, tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    shutil.copy(cifar_tiny_dir.archive, folder)
    ds = load_cifar10(folder, n_val=N_VAL, cache_dir=tmp_path / "cache")
    assert len(ds.train.y) == N_TRAIN


def test_data_dir_from_the_environment(cifar_tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(cifar_tiny_dir.batches))
    assert load_cifar10(None, n_val=N_VAL, cache_dir=tmp_path).source == str(cifar_tiny_dir.batches)


# ---- missing, empty, truncated, corrupt ----------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope", cache_dir=tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_missing_test_batch(cifar_tiny_dir, tmp_path):
    folder = copy_batches(cifar_tiny_dir, tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(folder, n_val=N_VAL, cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["half", "empty", "garbage", "one byte"])
def test_truncated_or_corrupt_batch_file(cifar_tiny_dir, tmp_path, damage):
    folder = copy_batches(cifar_tiny_dir, tmp_path)
    path = folder / "data_batch_3"
    raw = path.read_bytes()
    garbage = np.random.default_rng(0).bytes(5000)  # fixed bytes: see the length-field test below
    path.write_bytes({"half": raw[:len(raw) // 2], "empty": b"", "garbage": garbage,
                      "one byte": raw[:1]}[damage])
    with pytest.raises(DataError, match="data_batch_3"):  # the message names the bad file
        load_cifar10(folder, n_val=N_VAL, cache_dir=tmp_path)


@pytest.mark.parametrize("size", [2**64 - 1, 2**62], ids=["overflow", "memory"])
def test_corrupt_length_field_is_a_data_error(tmp_path, size):
    # a protocol-4 BINBYTES8 opcode whose 8-byte length no file could hold
    (tmp_path / "b").write_bytes(b"\x80\x04\x8e" + size.to_bytes(8, "little") + b"abc")
    with pytest.raises(DataError):
        load_batch(tmp_path / "b")


@pytest.mark.parametrize("content", [
    [1, 2, 3],                                                           # not a dict
    {b"labels": [0]},                                                    # no data
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},            # labels ≠ rows
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},        # label out of range
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]},        # negative label
    {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},          # wrong width
    {b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]},       # wrong dtype
    {b"data": np.zeros((0, 3072), np.uint8), b"labels": []},             # empty
    {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]},           # str keys
], ids=["list", "no-data", "short-labels", "label-10", "label-neg", "width", "dtype", "empty",
        "str-keys"])
def test_well_formed_pickle_that_is_not_a_batch(tmp_path, content):
    write_pickle(tmp_path / "b", content, 4)
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        load_batch(tmp_path / "b")


def test_non_numeric_labels_are_a_data_error(tmp_path):
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}
    write_pickle(tmp_path / "b", batch, 4)
    with pytest.raises(DataError):
        load_batch(tmp_path / "b")


def test_load_batch_on_a_real_batch(cifar_tiny_dir):
    # protocol 2 with numpy.core names (data_batch_1), 4 and 5 all read back exactly
    assert b"cnumpy.core.multiarray\n" in (cifar_tiny_dir.batches / "data_batch_1").read_bytes()
    for k, name in [(0, "data_batch_1"), (1, "data_batch_2"), (4, "data_batch_5")]:
        X, y = load_batch(cifar_tiny_dir.batches / name)
        rows = slice(k * N_PER_BATCH, (k + 1) * N_PER_BATCH)
        np.testing.assert_array_equal(X, cifar_tiny_dir.train_X[rows])
        np.testing.assert_array_equal(y, cifar_tiny_dir.train_y[rows])
        assert X.dtype == np.uint8 and y.dtype == np.int64


# ---- hostile pickles -----------------------------------------------------------------------------

class Reduce:
    """An object that unpickles as func(*args): the classic pickle code-execution payload."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(marker):
    touch = f"touch {marker}"
    good = tiny_batch(np.random.default_rng(0), 4, "x")
    return {
        "os.system": Reduce(os.system, (touch,)),
        "builtins.eval": Reduce(eval, (f"__import__('os').system({touch!r})",)),
        "subprocess.Popen": Reduce(subprocess.Popen, (["touch", str(marker)],)),
        "nested-in-data-dict": {**good, b"filenames": [b"a", Reduce(os.system, (touch,))]},
        "as-a-label": {**good, b"labels": [0, 1, 2, Reduce(os.system, (touch,))]},
    }


PAYLOADS = ["os.system", "builtins.eval", "subprocess.Popen", "nested-in-data-dict", "as-a-label"]


def unpickle_unsafely(raw):
    obj = pickle.loads(raw)  # noqa: S301 -- the control: what a plain pickle.load would do
    if isinstance(obj, subprocess.Popen):
        obj.wait()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_payloads_are_real(tmp_path, payload):
    """Control: unpickled with plain pickle, each payload does run its command."""
    marker = tmp_path / "MARKER"
    unpickle_unsafely(pickle.dumps(hostile_payloads(marker)[payload], protocol=4))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_pickle_is_refused_and_not_executed(tmp_path, payload, protocol):
    marker = tmp_path / "MARKER"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(hostile_payloads(marker)[payload], protocol=protocol))
    with pytest.raises(DataError, match="data_batch_1"):
        load_batch(path)
    assert not marker.exists()  # the refusal came before any of it ran


def test_hostile_batch_inside_a_data_set(cifar_tiny_dir, tmp_path):
    folder = copy_batches(cifar_tiny_dir, tmp_path)
    marker = tmp_path / "MARKER"
    write_pickle(folder / "data_batch_4", hostile_payloads(marker)["nested-in-data-dict"], 2)
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar10(folder, n_val=N_VAL, cache_dir=tmp_path)
    assert not marker.exists()


# ---- archives ------------------------------------------------------------------------------------

def add_bytes(tar, name, data=b"evil", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE
                else None)


def hostile_archive(cifar, path, add):
    """The valid tiny archive's members plus whatever add(tar) appends."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cifar.batches, arcname=BATCHES_DIR)
        add(tar)
    return path


def nothing_extracted(cache):
    return not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_archive_members_are_refused(cifar_tiny_dir, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "cache"

    def add(tar):
        if kind == "dotdot":  # cache/<tmp>/../evil and further up
            add_bytes(tar, "../evil")
            add_bytes(tar, f"{BATCHES_DIR}/../../../outside/evil")
        elif kind == "absolute":
            add_bytes(tar, str(outside / "evil"))
        elif kind == "symlink":  # a link out of the tree, then a file written through it
            add_bytes(tar, f"{BATCHES_DIR}/escape", b"", type=tarfile.SYMTYPE,
                      linkname=str(outside))
            add_bytes(tar, f"{BATCHES_DIR}/escape/evil")
        else:
            add_bytes(tar, f"{BATCHES_DIR}/evil", b"", type=tarfile.LNKTYPE,
                      linkname=str(outside / "target"))

    archive = hostile_archive(cifar_tiny_dir, tmp_path / "cifar-10-python.tar.gz", add)
    with pytest.raises(DataError, match="unsafe"):
        extract_archive(archive, cache)
    # nothing anywhere: no evil file in or outside the cache, no half-extracted folder
    assert list(tmp_path.rglob("evil")) == []
    assert list(outside.iterdir()) == []
    assert nothing_extracted(cache)


def test_extract_archive_wrong_md5(cifar_tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="checksum"):
        extract_archive(cifar_tiny_dir.archive, cache, expected_md5="0" * 32)
    assert nothing_extracted(cache)


def test_extract_archive_right_md5(cifar_tiny_dir, tmp_path):
    folder = extract_archive(cifar_tiny_dir.archive, tmp_path, expected_md5=cifar_tiny_dir.md5)
    assert folder == tmp_path / cifar_tiny_dir.md5 / BATCHES_DIR
    assert file_md5(folder / "data_batch_1") == file_md5(cifar_tiny_dir.batches / "data_batch_1")


def test_archive_md5_from_the_environment(cifar_tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_MD5", "f" * 32)
    with pytest.raises(DataError, match="checksum"):
        load_cifar10(cifar_tiny_dir.archive, cache_dir=tmp_path / "cache")
    assert nothing_extracted(tmp_path / "cache")


@pytest.mark.parametrize("content", ["not-gzip", "no-batches-folder"])
def test_archive_that_is_not_cifar(tmp_path, content):
    archive = tmp_path / "cifar-10-python.tar.gz"
    if content == "not-gzip":
        archive.write_bytes(np.random.default_rng(0).bytes(2000))
    else:
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "readme.txt").write_text("hello")
        make_archive(tmp_path / "other", archive)
    with pytest.raises(DataError):
        extract_archive(archive, tmp_path / "cache")
    assert nothing_extracted(tmp_path / "cache")


# ---- download ------------------------------------------------------------------------------------

class ArchiveServer:
    """The tiny archive over HTTP on 127.0.0.1 (pooch has no file:// downloader), honouring
    Range; `cut` drops the first response after that many bytes; `requests` logs each GET's
    Range header."""

    def __init__(self, payload, ranges=True):
        self.payload, self.ranges, self.cut, self.requests = payload, ranges, None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                if self.path != "/" + ARCHIVE:
                    return self.send_error(404)
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and \
                    server.ranges else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut is not None:  # a connection that drops mid-way, once
                    body, server.cut = body[:server.cut], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/{ARCHIVE}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(cifar_tiny_dir, monkeypatch):
    """ArchiveServer of the tiny archive; pooch retries at once (its waits patched out)."""
    monkeypatch.setattr(pooch.core.time, "sleep", lambda s: None)
    server = ArchiveServer(cifar_tiny_dir.archive.read_bytes())
    yield server
    server.close()


def test_download_over_http(cifar_tiny_dir, served, tmp_path, capfd):
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    got = download(served.url, dest, cifar_tiny_dir.md5)
    assert "Downloading file" not in capfd.readouterr().err  # pooch's own handler keeps quiet
    assert got == dest and file_md5(dest) == cifar_tiny_dir.md5  # the bytes arrived intact
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no .part left
    assert served.requests == [None]
    assert download(served.url, dest, cifar_tiny_dir.md5) == dest  # present: not fetched again
    assert served.requests == [None]


def test_a_dropped_download_is_retried_from_where_it_stopped(cifar_tiny_dir, served, tmp_path,
                                                            caplog):
    served.cut = 300_000  # of 796 kB
    dest = tmp_path / "dl" / ARCHIVE
    assert download(served.url, dest, cifar_tiny_dir.md5) == dest
    assert file_md5(dest) == cifar_tiny_dir.md5
    first, retry = served.requests
    # the retry asked for the rest only: what arrived, less the read the drop cut short
    assert first is None and retry == f"bytes={300_000 // CHUNK * CHUNK}-", served.requests
    assert "the connection closed after" in caplog.text


def test_a_download_left_by_an_earlier_run_is_resumed(cifar_tiny_dir, served, tmp_path):
    dest = tmp_path / "dl" / ARCHIVE
    dest.parent.mkdir()
    dest.with_name(ARCHIVE + ".part").write_bytes(served.payload[:500])
    assert download(served.url, dest, cifar_tiny_dir.md5) == dest
    assert file_md5(dest) == cifar_tiny_dir.md5 and served.requests == ["bytes=500-"]


def test_a_server_without_ranges_sends_the_whole_file_again(cifar_tiny_dir, served, tmp_path):
    served.ranges, served.cut = False, 300_000
    dest = tmp_path / "dl" / ARCHIVE
    assert download(served.url, dest, cifar_tiny_dir.md5) == dest
    assert file_md5(dest) == cifar_tiny_dir.md5 and len(served.requests) == 2


def test_download_with_a_wrong_md5_leaves_nothing(served, tmp_path):
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        download(served.url, dest, "0" * 32)
    assert f"expected {'0' * 32}" in str(e.value) and "\n" not in str(e.value)
    assert len(served.requests) == 1 + RETRIES  # pooch retried, each time from byte 0
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()
    assert list(dest.parent.iterdir()) == []


def test_download_of_a_missing_url_leaves_nothing(served, tmp_path):
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match="cannot download"):
        download(served.url.replace(ARCHIVE, "nope.tar.gz"), dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_a_file_url_names_the_variable_to_use(cifar_tiny_dir, tmp_path):
    with pytest.raises(DataError, match="set \\$CIFAR10_DIR to it"):
        download(cifar_tiny_dir.archive.as_uri(), tmp_path / ARCHIVE, cifar_tiny_dir.md5)
    assert list(tmp_path.iterdir()) == []


def test_no_source_downloads_checks_and_extracts(cifar_tiny_dir, served, tmp_path, monkeypatch):
    """With no --data-dir and no $CIFAR10_DIR the archive is fetched from $CIFAR10_URL."""
    monkeypatch.setenv("CIFAR10_URL", served.url)
    monkeypatch.setenv("CIFAR10_MD5", cifar_tiny_dir.md5)
    cache = tmp_path / "cache"
    folder = resolve_batches_dir(None, cache)
    assert folder == cache / cifar_tiny_dir.md5 / BATCHES_DIR
    ds = load_cifar10(None, n_val=N_VAL, cache_dir=cache)
    assert len(ds.test.y) == N_PER_BATCH
    # a second run finds the extraction and needs no network: a dead URL does not matter
    served.close()
    assert resolve_batches_dir(None, cache) == folder


def test_no_source_with_a_bad_checksum_extracts_nothing(served, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_URL", served.url)
    monkeypatch.setenv("CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch"):
        resolve_batches_dir(None, tmp_path / "cache")
    assert list((tmp_path / "cache").rglob("*")) == []


def test_pixels_of_another_dtype_are_not_used(cifar_tiny_dir, tmp_path):
    """float64 params on float32 data: the batch holds X's float32 rows, cast, not a float64
    re-normalisation of the pixels (which would differ in the last bits)."""
    ds = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, dtype="float32", cache_dir=tmp_path)
    idx = np.arange(5, 15)
    out = np.empty((10, 3072), dtype=np.float64)
    gather_batch(ds.train.X, idx, out, ds.train.pixels)
    np.testing.assert_array_equal(out, ds.train.X[idx].astype(np.float64))


# ---- issue 15: declared sizes, the cache's contents, links and a full or read-only cache -------

HUGE = (1_000_000, D)  # 3 GB of uint8, declared in a file of a few hundred bytes
PART = (100_000, D)    # a tenth of it (a dtype's size must fit in a C int)


def huge_declarations():
    """Batches that declare a 3 GB array (or scalar) in a few hundred bytes, each in another way
    numpy's reconstruction allows."""
    from numpy._core.multiarray import _reconstruct, scalar
    labels = list(range(10))
    return {
        "reconstruct": {b"data": Reduce(_reconstruct, (np.ndarray, HUGE, b"B")), b"labels": labels},
        "ndarray-call": {b"data": Reduce(np.ndarray, (HUGE, np.dtype("u1"))), b"labels": labels},
        "subarray-dtype": {b"data": Reduce(_reconstruct, (np.ndarray, (10,), np.dtype(("u1", PART)))),
                           b"labels": labels},
        "huge-labels": {b"data": np.zeros((10, D), np.uint8),
                        b"labels": Reduce(_reconstruct, (np.ndarray, (HUGE[0] * D // 8,), b"<i8"))},
        "scalar": {b"data": Reduce(scalar, (np.dtype(("u1", PART)), b"x")), b"labels": labels},
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(huge_declarations()))
def test_a_small_file_declaring_a_huge_array_is_refused_before_allocating(tmp_path, kind):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(huge_declarations()[kind], protocol=2))
    assert path.stat().st_size < 50_000  # a few hundred bytes (30 kB of them genuine pixels)
    # in a child whose address space is capped at 1 GB: a regression fails, it does not swap
    code = ("from clr_lambda_search.model.batch_files import load_batch\n"
            "from clr_lambda_search.model.errors import DataError\n"
            "try:\n"
            f"    X, y = load_batch({str(path)!r})\n"
            "    print('LOADED', X.shape)\n"
            "except DataError as e:\n"
            "    print('REFUSED', e)\n")
    proc = subprocess.run(limited([sys.executable, "-c", code], memory=1 << 30),
                          capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("REFUSED"), proc.stdout
    # the reason is the declared size, not an allocation that failed
    assert "byte array" in proc.stdout or "refused call" in proc.stdout, proc.stdout


def test_arrays_of_the_file_size_still_load(tmp_path):
    # control: the size check admits what genuine batches hold, in every protocol
    for protocol in (2, 4, 5):
        path = tmp_path / f"b{protocol}"
        write_pickle(path, tiny_batch(np.random.default_rng(0), 7, "x"), protocol)
        X, y = load_batch(path)
        assert X.shape == (7, D) and type(X) is np.ndarray


def cached_entry(cache):
    (entry,) = (cache / "arrays").iterdir()
    return entry


@pytest.mark.parametrize("damage", ["label-out-of-range", "negative-label", "scale-shape",
                                    "shift-not-finite", "labels-2d", "no-val-pixels"])
def test_a_damaged_cache_entry_is_rebuilt_not_trained_on(cifar_tiny_dir, tmp_path, damage, caplog):
    folder = copy_batches(cifar_tiny_dir, tmp_path)
    cache = tmp_path / "cache"
    fresh = load_cifar10(folder, n_val=N_VAL, cache_dir=cache)
    entry = cached_entry(cache)
    y = np.load(entry / "train_y.npy")
    if damage == "label-out-of-range":
        y[3] = 99
        np.save(entry / "train_y.npy", y)
    elif damage == "negative-label":
        y[0] = -1
        np.save(entry / "val_y.npy", y[:N_VAL])
    elif damage == "scale-shape":
        np.save(entry / "scale.npy", np.ones(1, np.float32))
    elif damage == "shift-not-finite":
        shift = np.load(entry / "shift.npy")
        shift[5] = np.nan
        np.save(entry / "shift.npy", shift)
    elif damage == "labels-2d":
        np.save(entry / "test_y.npy", np.load(entry / "test_y.npy")[:, None])
    else:
        (entry / "val_pixels.npy").unlink()
    data = load_cifar10(folder, n_val=N_VAL, cache_dir=cache)
    assert "rebuilding" in caplog.text
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(data, split).y, getattr(fresh, split).y)
        np.testing.assert_array_equal(getattr(data, split).X, getattr(fresh, split).X)
    np.testing.assert_array_equal(data.train.pixels.scale, fresh.train.pixels.scale)
    np.testing.assert_array_equal(data.train.pixels.shift, fresh.train.pixels.shift)
    assert fingerprint(data) == fingerprint(fresh)


def test_a_symlink_loop_is_named_as_such(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match="symlink loop") as e:
        resolve_batches_dir(loop, cache_dir=tmp_path / "cache")
    assert "does not exist" not in str(e.value)


def test_a_broken_symlink_names_its_target(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match="broken symlink") as e:
        resolve_batches_dir(link, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "gone") in str(e.value)


def test_disk_full_while_extracting_says_so(cifar_tiny_dir, tmp_path, monkeypatch):
    with full_disk(tmp_path / "cache", monkeypatch, opens=("tarfile.bltn_open",)) as (cache, _):
        with pytest.raises(DataError) as e:
            extract_archive(cifar_tiny_dir.archive, cache)
        message = str(e.value)
        assert "disk is full" in message and "re-download" not in message, message
        assert "CIFAR10_CACHE" in message
        assert not any(cache.rglob("data_batch_*"))  # the partial extraction was removed


def test_a_read_only_cache_cannot_take_the_archive(cifar_tiny_dir, served, tmp_path):
    with read_only(tmp_path / "cache") as cache:
        with pytest.raises(DataError, match="CIFAR10_CACHE") as e:
            extract_archive(cifar_tiny_dir.archive, cache / "sub")
        assert "re-download" not in str(e.value)
        with pytest.raises(DataError, match="CIFAR10_CACHE"):
            download(served.url, cache / "sub" / ARCHIVE, cifar_tiny_dir.md5)


def test_a_read_only_array_cache_falls_back_to_memory(cifar_tiny_dir, tmp_path, caplog):
    fresh = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache=False)
    with read_only(tmp_path / "cache") as cache:
        data = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache_dir=cache)
    assert "cannot cache" in caplog.text
    np.testing.assert_array_equal(data.train.X, fresh.train.X)
    assert fingerprint(data) == fingerprint(fresh)


# ---- the content fingerprint -----------------------------------------------------------------

def rewrite_batch(folder, name, change):
    with open(folder / name, "rb") as f:
        batch = pickle.load(f)  # noqa: S301 -- our own fixture's file
    change(batch)
    write_pickle(folder / name, batch, 4)


def flip_bit(pixels, at):
    pixels[at] ^= 1


def test_fingerprint_is_of_the_content_not_the_path(cifar_tiny_dir, tmp_path):
    a = load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache_dir=tmp_path / "c1")
    copy = copy_batches(cifar_tiny_dir, tmp_path)
    b = load_cifar10(copy, n_val=N_VAL, cache_dir=tmp_path / "c2")
    again = load_cifar10(copy, n_val=N_VAL, cache_dir=tmp_path / "c2")  # from the array cache
    uncached = load_cifar10(copy, n_val=N_VAL, cache=False, dtype="float64")
    assert len({fingerprint(d) for d in (a, b, again, uncached)}) == 1
    assert len(fingerprint(a)) == 64


@pytest.mark.parametrize("change", ["pixel", "label", "test-pixel", "n_val"])
def test_fingerprint_changes_with_the_content_or_the_split(cifar_tiny_dir, tmp_path, change):
    base = fingerprint(load_cifar10(cifar_tiny_dir.batches, n_val=N_VAL, cache=False))
    folder = copy_batches(cifar_tiny_dir, tmp_path)
    n_val = N_VAL
    if change == "pixel":  # the last image of data_batch_5: a validation image
        rewrite_batch(folder, "data_batch_5", lambda b: flip_bit(b[b"data"], (39, 7)))
    elif change == "label":
        rewrite_batch(folder, "data_batch_2", lambda b: b[b"labels"].__setitem__(
            0, (b[b"labels"][0] + 1) % 10))
    elif change == "test-pixel":
        rewrite_batch(folder, "test_batch", lambda b: flip_bit(b[b"data"], (0, 0)))
    else:
        n_val = N_VAL + 1
    assert fingerprint(load_cifar10(folder, n_val=n_val, cache_dir=tmp_path / "c")) != base


def test_fingerprint_of_a_data_set_built_in_memory(tiny_data):
    # datasets made by hand (tests, library users) get a digest of their arrays
    same = dataclasses.replace(tiny_data, source="elsewhere")
    assert fingerprint(tiny_data) == fingerprint(same)
    X = tiny_data.val.X.copy()
    X[0, 0] += 1
    other = dataclasses.replace(tiny_data, val=dataclasses.replace(tiny_data.val, X=X))
    assert fingerprint(other) != fingerprint(tiny_data)

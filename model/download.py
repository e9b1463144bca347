"""Finding CIFAR-10's batch folder: a local folder or archive, or the official archive downloaded
by pooch (retried, resumed, with a progress bar, and checked against its MD5 before anything in it
is read) and extracted safely into the cache, like torchvision."""
import errno
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from clr_lambda_search.model.batch_files import BATCHES_DIR, TRAIN_FILES
from clr_lambda_search.model.errors import DataError
from clr_lambda_search.model.resources import is_write_problem, write_problem

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
ENV_DIR, ENV_URL, ENV_MD5, ENV_CACHE = "CIFAR10_DIR", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_CACHE"
RETRIES = 3      # further attempts after a failed one (pooch waits 1 s, 2 s, … between them)
TIMEOUT = 60     # seconds without a byte before an attempt fails
CHUNK = 1 << 16  # bytes a read takes: a dropped connection loses at most the last one

log = logging.getLogger(__name__)


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
        if e.errno == errno.ENAMETOOLONG:
            raise DataError(f"data path {path} is too long a name for this system; point "
                            "--data-dir at a cifar-10-batches-py folder or the archive") from None
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
    """Fetch url to dest with pooch: up to RETRIES more attempts, each resuming the bytes the
    last one left in dest.part; dest appears only once its MD5 matches."""
    import pooch
    import requests

    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://", "ftp://")):
        raise DataError(f"cannot download {url}: only http(s) and ftp URLs are fetched; for a "
                        f"local copy set ${ENV_DIR} to it instead of ${ENV_URL}")
    # pooch's logger prints on its own handler, past the command's -q: ours says what it did
    pooch.get_logger().setLevel(logging.WARNING)
    fetcher = pooch.create(path=dest.parent, base_url="", registry={dest.name: f"md5:{md5}"},
                           urls={dest.name: url}, retry_if_failed=RETRIES)
    downloader = _resuming(dest) if url.lower().startswith("http") else None
    try:
        return Path(fetcher.fetch(dest.name, downloader=downloader))
    except ValueError as e:  # pooch: the MD5 of every attempt differed
        raise DataError(f"checksum mismatch for {url}: {_pooch_hashes(e, md5)}; the file is "
                        f"corrupt or not CIFAR-10 — retry, or set ${ENV_MD5} for a mirror you "
                        "trust") from None
    except (OSError, requests.RequestException) as e:
        if is_write_problem(e):  # the network is fine: the cache folder cannot take the file
            raise DataError(f"cannot download {url} into {dest.parent}: {write_problem(e)}; free "
                            f"space there or set ${ENV_CACHE} to a writable folder with ~0.4 GB "
                            "free") from None
        raise DataError(f"cannot download {url} ({e}); check the network, or set ${ENV_DIR} to a "
                        "local copy") from None


def _pooch_hashes(error, md5):
    """'MD5 <got>, expected <md5>' from pooch's mismatch message (its wording, else as is)."""
    words = [w.strip(".,:;'") for w in str(error).split()]
    got = [w for w in words if len(w) == 32 and w != md5]
    return f"MD5 {got[-1]}, expected {md5}" if got else str(error)


def _resuming(dest):
    """A pooch downloader over HTTP(S) that keeps the bytes received in dest.part and asks the
    next attempt (a retry, or the next run) for the rest only: pooch's own starts again from
    byte 0. The whole file is handed to pooch, which checks its MD5."""
    part = dest.with_name(dest.name + ".part")

    def fetch(url, output_file, pooch_, check_only=False):
        import requests
        from tqdm import tqdm

        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        log.info("downloading %s%s", url, f" from byte {have:,}" if have else "")
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            if r.status_code == 416 and have:  # nothing left to send: part is the whole file
                return os.replace(part, output_file)
            r.raise_for_status()
            if r.status_code != 206:  # the server ignored Range: start again
                have = 0
            size = int(r.headers.get("Content-Length") or 0)
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=have + size or None, initial=have, unit="B", unit_scale=True,
                    desc=f"downloading {dest.name}", leave=False) as bar:
                try:
                    for chunk in r.iter_content(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except requests.RequestException:
                    _closed_early(url, f.tell(), have + size)
                    raise
                got = f.tell()
        if size and got < have + size:  # closed early without an error: pooch retries too
            _closed_early(url, got, have + size)
            raise requests.ConnectionError(f"connection closed after {got:,} of {have + size:,} "
                                           "bytes")
        os.replace(part, output_file)  # pooch moves it to dest once its MD5 matches
    return fetch


def _closed_early(url, got, total):
    log.warning("%s: the connection closed after %s of %s bytes (kept for the next attempt)",
                url, f"{got:,}", f"{total:,}" if total else "?")


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
        raise _not_an_archive(archive, e) from None
    except (tarfile.TarError, EOFError, io.UnsupportedOperation) as e:
        raise _not_an_archive(archive, e) from None


SQLITE_HEADER = b"SQLite format 3\0"


def _not_an_archive(archive, e):
    """The one-line DataError for a file tarfile cannot read (its error spans lines), saying
    what it is when we can tell: an SQLite file is a study storage given as --data-dir."""
    try:
        with open(archive, "rb") as f:  # a regular file: tarfile has just opened it
            head = f.read(len(SQLITE_HEADER))
    except OSError:
        head = b""
    if head == SQLITE_HEADER:
        return DataError(f"{archive} is an SQLite database (a study storage?), not CIFAR-10: point "
                         "--data-dir (or $CIFAR10_DIR) at a cifar-10-batches-py folder or "
                         "cifar-10-python.tar.gz")
    why = " ".join(str(e).split())[:200]
    return DataError(f"{archive} is not a readable tar.gz archive ({why}); re-download it")


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

"""Storage and studies: open an RDB storage safely, name a campaign's studies, read results."""
import contextlib
import hashlib
import html
import logging
import os
import re
import sqlite3
import time
import urllib.parse
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from clr_lambda_search.model.errors import InputError
from clr_lambda_search.search import grpc_client, record
from clr_lambda_search.search.optuna_internals import claim_waiting

log = logging.getLogger(__name__)

DEFAULT_HOME = Path("studies")
DEFAULT_STORAGE = f"sqlite:///{DEFAULT_HOME}/studies.db"
PHASES = ("coarse", "fine")  # the phases of the releases before campaign files
HEARTBEAT_INTERVAL = 5   # seconds between a running trial's heartbeats
GRACE_PERIOD = 20        # a RUNNING trial silent this long belongs to a dead worker
MAX_RETRY = 3            # a trial whose worker died is re-queued (same λ) at most this often
FINISHED = (TrialState.COMPLETE,)  # what --n-trials counts; pruned trials come on top


def study_name(campaign, phase):
    """'<campaign>-<phase>', e.g. cifar10-coarse: one storage holds many campaigns."""
    return f"{campaign}-{phase}"


# Query keys whose values are secrets (libpq's password and sslpassword, tokens, keys).
_SECRET_WORDS = r"pass|pwd|secret|token|key|credential"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
# The same, for any text: key=value pairs (user:password@ is found by _password_span).
_PAIR = re.compile(rf"([?&;\s]([A-Za-z_]*(?:{_SECRET_WORDS})[A-Za-z_]*)=)([^&;\s]*)", re.IGNORECASE)
_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*:(?=[/\\])")  # scheme: before a (back)slash


def _password_span(text):
    """(start, end) of the password in URL-like text, or None: everything between the first `:`
    after the scheme and its (back)slashes, if any, and the last `@`. Needs no parse: any slashes
    or none, backslashes, no scheme, an unencoded `@` inside the password. A URL SQLAlchemy
    parses without a password has none (e.g. a SQLite path holding `:` and `@`)."""
    at = text.rfind("@")
    if at < 0:
        return None
    parsed = _try_parse(text)
    if parsed is not None and parsed.password is None:
        return None
    scheme = _SCHEME.match(text)
    colon = text.find(":", scheme.end() if scheme else 0, at)
    return None if colon < 0 else (colon + 1, at)


def _try_parse(url):
    try:
        return sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None


def mask_url(url):
    """The storage URL with every secret (the password, and query values such as ?password=)
    replaced by ***, for logs, JSON and pages; parsed or not."""
    text = _mask_text(url)
    parsed = _try_parse(text)
    if parsed is None or all(v == "***" for k, v in parsed.query.items() if _SECRET_KEY.search(k)):
        return text  # nothing left to mask (rendering would re-encode the URL)
    query = {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=False).replace("%2A%2A%2A", "***")


def _mask_text(text):
    span = _password_span(text)
    if span is not None and span[1] > span[0]:
        text = text[:span[0]] + "***" + text[span[1]:]
    return _PAIR.sub(r"\1***", text)


def url_secrets(url):
    """The secrets a storage URL holds (its password, secret query values), as parsed and as
    written (percent-encoded): what redact hides."""
    span = _password_span(url)
    found = [m.group(3) for m in _PAIR.finditer(url)]
    if span is not None:
        found += [url[span[0]:span[1]], urllib.parse.unquote(url[span[0]:span[1]])]
    parsed = _try_parse(url)
    if parsed is not None:
        found += [parsed.password or ""] + [v for k, vs in parsed.query.items() if _SECRET_KEY.search(k)
                                            for v in ((vs,) if isinstance(vs, str) else vs)]
    return sorted({str(s) for s in found if s}, key=len, reverse=True)


def redact(text, url):
    """text with every secret of the storage URL replaced by *** (e.g. a driver's error message)."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


def sqlite_path(url):
    """The database file of a sqlite:/// URL, else None."""
    parsed = sqlalchemy.engine.make_url(_parse(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def outputs_dir(campaign, storage=DEFAULT_STORAGE):
    """Where a campaign's results folder and dashboard go: studies/<campaign> for the default
    storage (sqlite:///studies/studies.db, by any URL of that file), studies/<campaign>-<digest>
    for any other, the digest being 8 hex digits of the masked URL's SHA-256: two storages that
    hold a campaign of one name never overwrite each other's outputs. A studies/<campaign>/
    whose dashboard names this storage (written by a release before this rule) stays its
    folder until a keyed one exists. storage: a URL, or a storage opened from one (its URL is
    read when it keeps one)."""
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)
    if url is None or _is_default(url):
        return DEFAULT_HOME / campaign
    keyed = DEFAULT_HOME / f"{campaign}-{hashlib.sha256(mask_url(url).encode()).hexdigest()[:8]}"
    legacy = DEFAULT_HOME / campaign
    if not keyed.exists() and _page_of(legacy / "dashboard.html", url):
        return legacy  # written there by a release before this one: its artifacts are there
    return keyed


# How a dashboard page names its storage (search.plots writes it; outputs_dir reads it)
STORAGE_LINE = "<p>storage {}</p>"


def _page_of(page, url):
    """Whether the dashboard page `page` shows the storage url (masked, escaped)."""
    try:
        text = Path(page).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return STORAGE_LINE.format(html.escape(mask_url(url), quote=True)) in text


def _is_default(url):
    try:
        path = sqlite_path(url)
    except Exception:  # a malformed URL: open_storage says so
        return False
    return path is not None and path.resolve() == (DEFAULT_HOME / "studies.db").resolve()


def open_storage(url, *, create=True, heartbeat_interval=HEARTBEAT_INTERVAL,
                 grace_period=GRACE_PERIOD, max_retry=MAX_RETRY):
    """RDBStorage for url with heartbeats and retry of dead workers' trials.

    With create=False nothing is created or converted: an SQLite file that does not exist yet is
    an error, Optuna's tables are not created (a storage without them is an error, not a new
    storage: it may be another program's database) and the journal mode is left as it is.
    Raises InputError for a malformed or unreachable URL. grpc://host:port is a storage proxy
    (search.grpc_server: the proxy holds the database and recovers dead workers' trials).
    """
    if grpc_client.is_grpc(url):
        return grpc_client.connect(url, heartbeat_interval)
    parsed = sqlalchemy.engine.make_url(_parse(url))
    path = sqlite_path(url)
    if path is not None:
        _prepare_sqlite_path(path, create)
    engine_kwargs = {"connect_args": _connect_args(parsed)}
    try:
        storage = _create_tables_once(lambda: ClaimingRDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period, skip_table_creation=not create,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry)))
        if path is not None and create:
            _write_ahead_log(storage)
        return storage
    except ImportError as e:
        raise InputError(f"storage {mask_url(url)} needs a driver that is not installed ({e.name}); "
                         "for PostgreSQL: pip install 'clr-lambda-search[postgres]' and use "
                         "postgresql+psycopg://") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError,
            ValueError) as e:
        e = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) else e
        failure = storage_failure(e)
        if failure:
            raise InputError(f"cannot open storage {mask_url(url)}: {failure}") from None
        reason = redact(str(getattr(e, "orig", None) or e).splitlines()[0], url)
        if not create and _NO_TABLES in reason:
            raise InputError(f"storage {mask_url(url)} holds no Optuna studies (it has no "
                             "version_info table: another program's database?); check --storage"
                             ) from None
        raise InputError(f"cannot open storage {mask_url(url)} ({reason}); check the URL, the "
                         "server and the credentials") from None


class ClaimingRDBStorage(RDBStorage):
    """RDBStorage whose workers can never both take one queued (WAITING) trial.

    Optuna takes a queued trial by reading its state and then writing RUNNING, in two statements
    (SELECT … FOR UPDATE, which SQLite ignores): two SQLite workers can both read WAITING and both
    run the trial, and the second to finish fails ("Cannot tell a COMPLETE trial"). A retried
    trial is queued, so SIGTERM or a kill followed by a run with several workers hit this almost
    every time. Here the claim is one conditional UPDATE, atomic on every database. Overriding a
    public storage method; the UPDATE is search.optuna_internals.claim_waiting (no public API
    updates a trial's state conditionally). Tested in tests/test_search.py.
    """

    def set_trial_state_values(self, trial_id, state, values=None):
        if state != TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        if claim_waiting(self, trial_id):
            return True
        self.check_trial_is_updatable(trial_id, self.get_trial(trial_id).state)  # finished: raises
        return False  # another worker took it


CONNECT_TIMEOUT = 10  # seconds to reach a database server (a silent one must not hang a command)
# libpq: give up on a server that stops answering mid-session (TCP keepalives, then a dead peer).
_PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                  "keepalives_count": 3}


def _connect_args(parsed):
    """Driver arguments: SQLite waits up to 30 s for a lock; servers get connect timeouts and
    keepalives. What the URL's query sets itself wins."""
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        args = {"timeout": 30}
    elif backend == "postgresql":
        args = {"connect_timeout": CONNECT_TIMEOUT, **_PG_KEEPALIVES}
    elif backend == "mysql":
        args = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": 120, "write_timeout": 120}
    else:
        args = {}
    return {k: v for k, v in args.items() if k not in parsed.query}


_NO_TABLES = "version_info"  # the table Optuna reads first: missing in a database it never wrote


def _write_ahead_log(storage):
    """Put the SQLite file in write-ahead-log mode (it stays so; a no-op once it is).

    With SQLite's default rollback journal a commit locks out every other process, readers
    included, and a worker that finds the file locked backs off in sleeps of up to 100 ms: with
    two workers a trial's storage time went from ~0.06 to ~0.13 s. In WAL mode readers never wait
    and writers wait only for each other (0.05 s), and a crash is still rolled back. WAL needs
    every process on one machine, which SQLite studies are (PostgreSQL spans machines).
    """
    with storage.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
    if mode != "wal":  # e.g. a file system without shared memory: the default journal still works
        log.warning("SQLite study file stays in %s journal mode (WAL unavailable)", mode)


_CREATION_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key value")


def _create_tables_once(make, attempts=8):
    """make() an RDBStorage; when processes open a fresh storage together, all but one lose the
    race to create its tables ("already exists", "UNIQUE constraint failed: alembic_version"):
    they try again once the winner is done."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return make()
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == attempts - 1 or not any(m in str(e) for m in _CREATION_RACE):
                raise
            log.info("storage tables being created by another process; retrying")
            time.sleep(0.2 * (attempt + 1) + 0.05 * (os.getpid() % 7))  # spread the retries


# What a database says when it cannot write, and what the user can do about it.
_STORAGE_FAILURES = (
    (("database or disk is full", "No space left", "could not extend file", "DiskFull"),
     "the study storage's disk is full: free space, or choose another --storage"),
    (("readonly database", "read-only", "read only"),
     "the study storage cannot be written (read-only file or folder): make it writable, or "
     "choose another --storage"),
    (("disk I/O error",), "the study storage's disk failed to write (disk I/O error): check the "
                         "disk, or choose another --storage"),
)


def storage_failure(error):
    """The one-line cause of a storage write failure (disk full, read-only, I/O error), or None
    when the error is not one of them."""
    kind = storage_failure_kind(error)
    return None if kind is None else storage_failure_message(kind)


def storage_failure_kind(error):
    """The index of the error's cause in _STORAGE_FAILURES (a worker's exit status carries it to
    the parent), or None."""
    if isinstance(error, optuna.exceptions.StorageInternalError):
        error = error.__cause__  # Optuna wraps a failed commit
    if not isinstance(error, sqlalchemy.exc.SQLAlchemyError):
        return None
    text = str(getattr(error, "orig", None) or error).lower()
    for kind, (needles, _) in enumerate(_STORAGE_FAILURES):
        if any(n.lower() in text for n in needles):
            return kind
    return None


def storage_failure_message(kind):
    return _STORAGE_FAILURES[kind][1]


def check_storage(url):
    """Fail early (InputError) on a storage that open_storage would refuse, creating nothing:
    SQLite paths are checked, a server is connected to."""
    path = sqlite_path(_parse(url))
    if path is not None:
        _prepare_sqlite_path(path, create=True, dry_run=True)
    else:
        open_storage(url).remove_session()


def _parse(url):
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        parsed = None
    if parsed is None or "@" in (parsed.host or ""):  # an `@` in the password, unencoded
        raise InputError(f"malformed storage URL {mask_url(url)!r}; use e.g. sqlite:///studies/studies.db or "
                         "postgresql+psycopg://user:password@host/db or grpc://host:port (write an "
                         "@ or / inside the password as %40 or %2F)") from None
    return url


def _prepare_sqlite_path(path, create, dry_run=False):
    if path.is_dir():
        raise InputError(f"storage path {path} is a folder; name a database file, e.g. "
                         f"sqlite:///{path}/studies.db")
    if path.exists() and not path.is_file():  # a FIFO, a device: SQLite says "disk I/O error"
        raise InputError(f"storage path {path} is not a regular file; name a database file")
    if path.is_file() and (os.getpid(), path.resolve()) not in _CHECKED:
        _check_foreign_sqlite(path)
        _CHECKED.add((os.getpid(), path.resolve()))
    if not create and not path.is_file():
        raise InputError(f"no storage at {path}; run `scripts/search.py coarse` first or pass "
                         "--storage")
    if create:
        if path.parent.exists() and not path.parent.is_dir():
            raise InputError(f"storage path {path} lies under a file; choose another --storage")
        if not path.parent.exists() and path.parent.resolve() == DEFAULT_HOME.resolve():
            if not dry_run:
                path.parent.mkdir(parents=True)  # the default home is created on first use
        elif not path.parent.is_dir():
            raise InputError(f"folder {path.parent} of the storage does not exist; create it or "
                             "choose another --storage")


# (process, SQLite file) pairs already checked. The check opens and closes the file outside
# SQLite, and closing any descriptor of a file drops every POSIX lock this process holds on it,
# those of its open SQLite connections included: with other processes writing, a connection
# whose locks vanished read torn pages ("disk I/O error", seen with 3 runners). A process
# checks a file once, before its first connection; a forked worker (another pid) opens none of
# its parent's connections (they are disposed before the fork) and checks on its own.
_CHECKED = set()


def _check_foreign_sqlite(path):
    """InputError for an existing file that is not an empty or Optuna SQLite database: opening it
    as a storage would add Optuna's tables to another program's database (or fail on a text file)
    and switch it to write-ahead logging."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return  # unreadable: opening it reports that
    if not head:
        return  # an empty file: SQLite makes a database of it
    if head != b"SQLite format 3\x00":
        raise InputError(f"storage path {path} is not an SQLite database; name a new file or an "
                         "Optuna study storage")
    try:
        # immutable: no locks, no -wal/-shm files left behind (a read-only connection cannot
        # remove them); a table list still in an unmerged WAL only makes the check lenient
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro&immutable=1"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error:
        return  # cannot look inside (e.g. a locked or read-only WAL file): opening it tells
    if tables and "studies" not in tables:
        raise InputError(f"storage path {path} is another program's SQLite database (tables: "
                         f"{', '.join(sorted(tables)[:5])}); name a new file or an Optuna study storage")


def load_study(storage, name, sampler=None, pruner=None):
    """An existing study, or InputError naming the studies the storage does hold."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        have = ", ".join(sorted(names)) or "none"
        raise InputError(f"no study {name!r} in the storage (it holds: {have}); check --campaign "
                         "or run the coarse phase first")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def campaign_studies(storage, campaign):
    """The campaign's phase studies in storage, in phase order; InputError if none.

    A study belongs to the campaign its user attrs name (every release recorded it); a study
    without them is found under the old names <campaign>-coarse / -fine."""
    # the final run's study (search.final) is no search phase: its test accuracy must not be a pick
    mine = [s for s in _summaries(storage)
            if _campaign_of(s) == campaign and record.read(s).is_phase]
    if not mine:
        have = ", ".join(campaigns(storage)) or "none"
        raise InputError(f"no campaign {campaign!r} in the storage (campaigns: {have}); "
                         "check --campaign or --storage")
    mine.sort(key=lambda s: (s.user_attrs.get("phase_index", _old_index(s.study_name)),
                             s.study_name))
    return [optuna.load_study(study_name=s.study_name, storage=storage) for s in mine]


def _summaries(storage, tries=5):
    """Every study's summary. A study deleted while they are read (a storage lock that another
    runner released: search.lock) makes Optuna raise KeyError: read them again."""
    for _ in range(tries - 1):
        try:
            return optuna.get_all_study_summaries(storage, include_best_trial=False)
        except KeyError:
            continue
    return optuna.get_all_study_summaries(storage, include_best_trial=False)


def _campaign_of(frozen):
    if "campaign" in frozen.user_attrs:
        return frozen.user_attrs["campaign"]
    head, _, phase = frozen.study_name.rpartition("-")
    return head if phase in PHASES else None


def _old_index(name):
    phase = name.rpartition("-")[2]
    return PHASES.index(phase) if phase in PHASES else len(PHASES)


def campaigns(storage):
    """Campaign names that have at least one phase study in the storage."""
    return sorted({c for s in _summaries(storage) if (c := _campaign_of(s))})


def named_study(storage, name):
    """[the study called name] (status and dashboard of any study); InputError if none."""
    return [load_study(storage, name)]


def finished_trials(study):
    """COMPLETE trials sorted by value, best first."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: t.value, reverse=True)


def retried_from(trial):
    """The number of the trial this one re-runs after its worker died (the one right before it
    in a chain of retries), or None. trial: a FrozenTrial."""
    chain = retry_chain(trial)
    return chain[-1] if chain else None


def retry_chain(trial):
    """[the first trial, its retry, …] up to the one this FrozenTrial re-runs; [] if no retry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


RETIRED = ".retired-"


def retire_study(storage, name):
    """Keep study `name` as <name>.retired-<k> (marked retired) and delete it under its name."""
    taken = set(optuna.get_all_study_names(storage))
    k = 1
    while f"{name}{RETIRED}{k}" in taken:
        k += 1
    new = f"{name}{RETIRED}{k}"
    optuna.copy_study(from_study_name=name, from_storage=storage, to_storage=storage,
                      to_study_name=new)
    record.update(optuna.load_study(study_name=new, storage=storage), retired=True)
    optuna.delete_study(study_name=name, storage=storage)
    log.warning("study %s retired (kept as %s)", name, new)
    return new

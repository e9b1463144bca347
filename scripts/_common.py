"""What every script shares: one-line errors with exit 2, --json output, logging, BLAS threads,
and the TrainConfig flags. Scripts are run as `python scripts/NAME.py`, so this imports as `_common`.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

# scripts/search.py would shadow the `search` package: once this module is loaded, imports resolve
# from the installed packages only, not from the scripts folder.
_SCRIPTS = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _SCRIPTS]

from model.errors import DivergedError, InputError, Terminated, WorkersFailed  # noqa: E402
from model.resources import is_write_problem, write_problem  # noqa: E402
from model.train import SEED_LIMIT, TrainConfig  # noqa: E402
from search.study import DEFAULT_STORAGE, redact, sqlite_path, storage_failure  # noqa: E402
import sqlalchemy  # noqa: E402
from optuna.exceptions import StorageInternalError  # noqa: E402

EXIT_BAD_INPUT = 2
WORKERS_PER_CPU = 4  # --workers above this many per CPU is a typo, not a plan (each is a process)
STORAGE_ENV = "OPTUNA_STORAGE"  # what Optuna's own CLI reads: keeps a password out of `ps`
_storage_urls = []  # every storage URL given to this process: its secrets never reach stderr
MAX_REPEATS = 1000   # seeds per λ: each trial trains them all, and lists them in the study

TRAIN_FLAG_HELP = {
    "lam": "L2 strength λ (cost = loss + λ(‖W1‖²+‖W2‖²))",
    "m": "hidden units",
    "n_batch": "samples per update",
    "eta_min": "cyclical learning rate: lower bound",
    "eta_max": "cyclical learning rate: upper bound",
    "n_s": "half cycle of the learning rate, in updates",
    "cycles": "number of cycles; training stops at the end of the last one",
    "evals_per_cycle": "evaluation points per cycle (for the curves)",
    "eval_train_samples": "train metrics on this many training samples (0 = all)",
    "seed": "seed of init and shuffling",
    "dtype": "float32 (fast) or float64",
    "dropout": "inverted dropout: probability of dropping a hidden unit in training, in [0, 1)",
    "flip": "flip each training image left-right with probability 1/2",
    "shift": "translate each training image by up to this many pixels (borders reflected), 0..31",
    "precision": "the two large products in fp32, bf16 (fp32 accumulation and master weights; "
                 "needs bf16 instructions and MKL) or auto (bf16 where it pays)",
}


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default, unless its help text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits 2, and whose --help
    shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")

    def add_storage(self):
        self.add_argument("--storage", default=None,
                          help=f"SQLAlchemy URL of the study storage (default: ${STORAGE_ENV}, else "
                               f"{DEFAULT_STORAGE}); put a password in ${STORAGE_ENV}, not here, to "
                               "keep it out of the process list")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if hasattr(parsed, "storage"):
            parsed.storage = storage_url(parsed.storage)
        return parsed

    def require_positive(self, args, *dests):
        """The error above for the first of these counts below 1 (None: not given, allowed)."""
        for dest in dests:
            value = getattr(args, dest)
            if value is not None and value <= 0:
                self.error(f"--{_flag(dest)} must be ≥ 1 (got {value})")

    def require_seed(self, args, dest, count=1):
        """The error above unless the seeds dest, dest + 1, …, dest + count − 1 are all in
        0..SEED_LIMIT − 1 (Optuna's samplers and TrainConfig take 32-bit seeds)."""
        value = getattr(args, dest)
        if not 0 <= value <= SEED_LIMIT - count:
            span = f" (and the next {count - 1})" if count > 1 else ""
            self.error(f"--{_flag(dest)} {value}{span} must lie in 0..{SEED_LIMIT - 1}")

    def require_finite(self, args, *dests):
        """The error above for the first of these floats that is nan or ±inf (None: allowed)."""
        for dest in dests:
            value = getattr(args, dest)
            if value is not None and not math.isfinite(value):
                self.error(f"--{_flag(dest)} must be a finite number (got {value})")

    def require_workers(self, args, dest="workers"):
        """The error above for more than WORKERS_PER_CPU worker processes per CPU, and for more
        final seeds (--seeds, which train at once, a process each, when --workers > 1)."""
        limit = WORKERS_PER_CPU * cpu_count()
        if getattr(args, dest) > limit:
            self.error(f"--{_flag(dest)} {getattr(args, dest)} is more than {WORKERS_PER_CPU} per "
                       f"CPU ({limit} on this machine's {cpu_count()}); on several machines, run "
                       "the command on each against one --storage")
        seeds = getattr(args, "seeds", None) or 1  # None: the campaign file's
        if getattr(args, dest) > 1 and seeds > limit:
            self.error(f"--seeds {seeds} would start as many processes at once (at most {limit} "
                       f"here: {WORKERS_PER_CPU} per CPU); use fewer, or --workers 1 to train them "
                       "one after another")


    def require_repeats(self, args):
        if args.repeats > MAX_REPEATS:
            self.error(f"--repeats {args.repeats} is more than {MAX_REPEATS} seeds per λ")


def _flag(dest):
    return dest.replace("_", "-")


def cpu_count():
    """The CPUs this process may run on (its affinity), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def storage_url(flag=None):
    """The storage URL: the --storage flag, else $OPTUNA_STORAGE, else the default SQLite file.
    Its secrets are registered: fail() and the log hide them."""
    url = flag or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    _storage_urls.append(url)
    return url


def protected_paths(url):
    """The files an output may never be or contain: an SQLite storage and its journal files."""
    try:
        path = sqlite_path(url)
    except InputError:
        return ()  # a malformed URL: opening the storage reports it
    if path is None:
        return ()
    return (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal")))


def hide_secrets(text):
    for url in _storage_urls:
        text = redact(text, url)
    return text


class _HideSecrets(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        hidden = hide_secrets(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def fail(message):
    """One line on stderr, exit status 2, no traceback."""
    sys.stderr.write(f"error: {hide_secrets(str(message))}\n")
    sys.exit(EXIT_BAD_INPUT)


def add_common_args(parser):
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object on stdout (logs go to stderr)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def add_data_args(parser):
    parser.add_argument("--data-dir", default=None,
                        help="cifar-10-batches-py folder, a folder holding it, or "
                             "cifar-10-python.tar.gz (default: $CIFAR10_DIR, else download)")
    parser.add_argument("--n-val", type=int, default=1000,
                        help="validation images: the last N of data_batch_5")


def add_train_args(parser, defaults=TrainConfig(), skip=()):
    """One kebab-case flag per TrainConfig field, defaulting to `defaults` (None: to None, for
    flags that override a campaign file only when given)."""
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        default = getattr(defaults, field.name) if defaults else None
        kind = type(getattr(TrainConfig(), field.name))
        # a bool is a switch, --flip / --no-flip: type=bool would take "--flip False" as True
        parse = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + field.name.replace("_", "-"), default=default, **parse,
                            help=f"{TRAIN_FLAG_HELP[field.name]} (default "
                                 f"{default if defaults else 'from the campaign'})")


def add_campaign_args(parser, campaign_help="the campaign's name (default: the file's)"):
    from search.campaign import DEFAULT, shipped  # imports Optuna: only the scripts that search

    parser.add_argument("--config", default=DEFAULT,
                        help="campaign file (TOML), or the name of a shipped one: "
                             f"{', '.join(shipped())} (default {DEFAULT})")
    parser.add_argument("--campaign", default=None, help=campaign_help)


def campaign(args):
    """The Campaign of --config, renamed by --campaign when given."""
    from search.campaign import load_campaign

    from search.campaign import check_name

    c = load_campaign(args.config)
    return dataclasses.replace(c, name=check_name(args.campaign, "--campaign")) if args.campaign \
        else c


def given_train_flags(args, skip=()):
    """{field: value} of the TrainConfig flags given on the command line (not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def train_config(args, **overrides):
    """TrainConfig from the parsed flags (raises ConfigError on a bad value)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    values.update(overrides)
    return TrainConfig(**values)


def setup_logging(args):
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_HideSecrets())
    import optuna

    # our own log says what a trial did; Optuna's warning for a failed trial carries a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def emit(summary, args, text):
    """The result: one JSON object with --json, else the human text; both on stdout. JSON has no
    NaN or Infinity: a non-finite number is written as null."""
    print(json.dumps(_finite(summary), default=float, allow_nan=False) if args.json else text,
          flush=True)


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) or getattr(obj, "dtype", None) is not None and obj.dtype.kind == "f" \
            and obj.ndim == 0:
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def trial_bar(total, desc, args):
    """progress_bar of trials, for search.phases.run_phase: without a bar nobody polls the study
    for one (a poll reads every trial, ~30 ms of the CPU the workers train on, once a second)."""
    return progress_bar(total, desc, args, unit="trial")


@contextlib.contextmanager
def progress_bar(total, desc, args, unit):
    """A tqdm bar on stderr; yields progress(n done), or None with --quiet or when stderr is not a
    terminal (no bar: the caller skips the work of reporting)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=args.quiet or None)
    if bar.disable:
        yield None
        return

    def progress(n):
        if min(n, total) != bar.n:  # polled every second: redraw only on change
            bar.n = min(n, total)
            bar.refresh()
    try:
        yield progress
    finally:
        bar.close()


def single_blas_thread():
    """Pin BLAS to one thread: these GEMMs are too small for two (see DESIGN.md, Speed)."""
    return blas_threads(1)


def blas_threads(n):
    """Limit BLAS to n threads (the step's kernels call the same BLAS: model.blas)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up
    raise Terminated()


def run(main):
    """Run main(); user errors become one line and exit 2, Ctrl-C exits 130 and SIGTERM 143 with
    one line (SIGTERM raises Terminated, in this process and in its forked workers)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except InputError as e:
        fail(str(e))
    except OSError as e:
        if not is_write_problem(e):
            raise
        # a full disk, a read-only folder: the environment's fault, named, without a traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        fail(f"cannot write{where}: {write_problem(e)}; free space or choose another place "
             "(--out, --storage, $CIFAR10_CACHE)")
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as e:
        why = storage_failure(e)
        if why is None:
            raise
        fail(why)
    except (WorkersFailed, DivergedError) as e:  # not the input's fault: exit 1, still one line
        sys.stderr.write(f"error: {hide_secrets(str(e))}\n")
        sys.exit(1)
    except Terminated:
        sys.stderr.write("terminated: running trials were marked FAIL and are retried by the next "
                         "run; partial results were not written; re-run to resume\n")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: partial results were not written; re-run to resume\n")
        sys.exit(130)

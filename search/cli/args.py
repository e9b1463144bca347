"""The command-line parser every command uses, and the flags they share."""
import argparse
import dataclasses
import math

from clr_lambda_search.model.train import SEED_LIMIT, TrainConfig
from clr_lambda_search.search.cli.errors import fail
from clr_lambda_search.search.cli.storage import STORAGE_ENV, storage_url
from clr_lambda_search.search.cli.threads import cpu_count
from clr_lambda_search.search.phases import MAX_REPEATS
from clr_lambda_search.search.study import DEFAULT_STORAGE

WORKERS_PER_CPU = 4  # --workers above this many per CPU is a typo, not a plan (each is a process)

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
                 "needs bf16 instructions and MKL or oneDNN) or auto (bf16 where it pays)",
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
        for dest, values in vars(parsed).items():  # "" must not fall back to a default unseen
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and not value.strip():
                    self.error(f"--{_flag(dest)} is empty; give a value or leave the flag out "
                               "for its default")
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
        problem = final_processes_problem(getattr(args, "seeds", None) or 1, getattr(args, dest))
        if problem:  # seeds None: the campaign file's, checked once it is resolved
            self.error(problem)

    def require_repeats(self, args):
        if args.repeats > MAX_REPEATS:
            self.error(f"--repeats {args.repeats} is more than {MAX_REPEATS} seeds per λ")


def final_processes_problem(seeds, workers, said="--seeds"):
    """Why `seeds` final seeds with `workers` workers are too many processes at once, or None."""
    limit = WORKERS_PER_CPU * cpu_count()
    if workers > 1 and seeds > limit:
        return (f"{said} {seeds} would start as many processes at once (at most {limit} here: "
                f"{WORKERS_PER_CPU} per CPU); use fewer, or --workers 1 to train them one after "
                "another")
    return None


def _flag(dest):
    return dest.replace("_", "-")


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


def add_heartbeat_args(parser):
    from clr_lambda_search.search.study import GRACE_PERIOD, HEARTBEAT_INTERVAL

    parser.add_argument("--heartbeat-interval", type=int, default=HEARTBEAT_INTERVAL,
                        help="seconds between a running trial's heartbeats")
    parser.add_argument("--grace-period", type=int, default=GRACE_PERIOD,
                        help="seconds after which a silent RUNNING trial is failed and retried")


MAX_HEARTBEAT_INTERVAL = 3600  # seconds: an hour between heartbeats
MAX_GRACE_PERIOD = 7 * 86400   # seconds: a week before a silent trial counts as dead


def storage_opts(parser, args):
    """The storage options of --heartbeat-interval and --grace-period (checked)."""
    if not 0 < args.heartbeat_interval < args.grace_period:
        parser.error("--heartbeat-interval must be > 0 and below --grace-period")
    if args.heartbeat_interval > MAX_HEARTBEAT_INTERVAL:
        parser.error(f"--heartbeat-interval {args.heartbeat_interval} is more than "
                     f"{MAX_HEARTBEAT_INTERVAL} seconds")
    if args.grace_period > MAX_GRACE_PERIOD:
        parser.error(f"--grace-period {args.grace_period} is more than {MAX_GRACE_PERIOD} seconds "
                     "(a week)")
    return {"heartbeat_interval": args.heartbeat_interval, "grace_period": args.grace_period}


def add_campaign_args(parser, campaign_help="the campaign's name (default: the file's)"):
    from clr_lambda_search.search.campaign import DEFAULT, shipped  # imports Optuna: only the scripts that search

    parser.add_argument("--config", default=DEFAULT,
                        help="campaign file (TOML), or the name of a shipped one: "
                             f"{', '.join(shipped())} (default {DEFAULT})")
    parser.add_argument("--campaign", default=None, help=campaign_help)


def add_set_arg(parser, example="phases.coarse.n_trials=4"):
    """--set KEY=VALUE (repeatable): a setting by its dotted name (search.settings; docs/cli.md)."""
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"override a setting by its dotted name, e.g. {example} (repeatable; "
                             "wins over the flags; see docs/cli.md)")


def add_dry_run_arg(parser):
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved campaign and an estimate of its updates and time, "
                             "then stop: no data or storage is read, nothing is written")

"""A command's output: the result on stdout (--json or text), logs and progress bars on stderr."""
import contextlib
import json
import logging
import math
import sys

from clr_lambda_search.search.cli.storage import HideSecrets


def setup_logging(args):
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideSecrets())
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


@contextlib.contextmanager
def phase_bars(args):
    """Yields the core's progress callback (study name, done, total, unit): one tqdm bar per
    phase on stderr, or None with --quiet or when stderr is not a terminal (no bar: nobody polls
    the study for one; a poll reads every trial, once a second)."""
    from tqdm import tqdm

    if args.quiet or not sys.stderr.isatty():
        yield None
        return
    bars = {}

    def progress(name, done, total, unit):
        if name not in bars:
            for bar in bars.values():
                bar.close()
            bars[name] = tqdm(total=total, desc=name, unit=unit, leave=False)
        _advance(bars[name], done)
    try:
        yield progress
    finally:
        for bar in bars.values():
            bar.close()


def _advance(bar, n):
    """Show n done on a tqdm bar; polled every second: redrawn only on change."""
    if min(n, bar.total) != bar.n:
        bar.n = min(n, bar.total)
        bar.refresh()


@contextlib.contextmanager
def progress_bar(total, desc, args, unit):
    """A tqdm bar on stderr; yields progress(n done), or None with --quiet or when stderr is not a
    terminal (no bar: the caller skips the work of reporting)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=args.quiet or None)
    if bar.disable:
        yield None
        return

    try:
        yield lambda n: _advance(bar, n)
    finally:
        bar.close()

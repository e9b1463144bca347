"""Run one phase of a campaign with Optuna, or show its studies: resumable, with parallel workers.

    python scripts/search.py coarse [--config dd2424] [--campaign cifar10] [--workers 2]
    python scripts/search.py fine   [--n-trials 12 | --values 1e-3,2e-3]
    python scripts/search.py status [--campaign cifar10 | --study NAME] [--json]

PHASE is a phase of the campaign file (dd2424: coarse, fine); flags override the file. Re-running
a phase resumes it: it stops once the study holds its number of COMPLETE trials in total (pruned
and failed trials come on top; with --values, each value is tried once). Several shells or
machines may run the same command against one --storage.
"""
import dataclasses
import time

import _common
from model.dataset import load_cifar10
from model.errors import ConfigError
from model.resources import check_memory
from search.campaign import grid_param, source_space, validated, with_config, with_phase
from search.confirm import run_confirm
from search.phases import phase_spec, run_spec
from search.report import phase_summary, status_report, status_text, summary_text
from search.runner import PRUNERS, SAMPLERS
from search.space import Categorical, Int, parse_values
from search.study import (GRACE_PERIOD, HEARTBEAT_INTERVAL, check_storage, mask_url,
                          open_storage)


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    p.add_argument("phase", help="a phase of the campaign (dd2424: coarse, fine), or status")
    _common.add_campaign_args(p, "names the studies <campaign>-<phase> (default: the file's)")
    p.add_argument("--study", default=None, help="status: show this study (any name) instead")
    p.add_storage()
    p.add_argument("--n-trials", type=int, default=None,
                   help="finished trials the phase ends with (default: the campaign's)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--repeats", type=int, default=None,
                   help="seeds trained per trial (mean is the objective)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampler seed of the study (training seed: --train-seed)")
    p.add_argument("--train-seed", type=int, default=None, help="first training seed of every trial")
    p.add_argument("--sampler", default=None,
                   help=f"{', '.join(SAMPLERS)} or an optuna.samplers class name "
                        "(default: the campaign's)")
    p.add_argument("--pruner", default=None,
                   help=f"{', '.join(PRUNERS)} or an optuna.pruners class name (default: the "
                        "campaign's; none with --values)")
    p.add_argument("--low", type=float, default=None,
                   help="lower bound of the phase's parameter (a phase with one parameter)")
    p.add_argument("--high", type=float, default=None, help="its upper bound")
    p.add_argument("--values", default=None,
                   help="a comma-separated list of values of the phase's parameter (grid)")
    p.add_argument("--top-k", type=int, default=None, help="narrowed phase: best trials spanned")
    p.add_argument("--margin", type=float, default=None,
                   help="narrowed phase: added on each side of the span (decades for a log "
                        "parameter, fractions of the earlier range for a linear one)")
    p.add_argument("--heartbeat-interval", type=int, default=HEARTBEAT_INTERVAL, help="seconds")
    p.add_argument("--grace-period", type=int, default=GRACE_PERIOD,
                   help="seconds after which a silent RUNNING trial is failed and retried")
    _common.add_train_args(p, None, skip=("seed",))
    _common.add_data_args(p)
    _common.add_common_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    p.require_positive(args, "n_trials", "workers", "repeats", "top_k")
    p.require_workers(args)
    for dest, count in (("seed", 1), ("train_seed", args.repeats or 1)):
        if getattr(args, dest) is not None:
            p.require_seed(args, dest, count=count)
    if args.repeats is not None:
        p.require_repeats(args)
    p.require_finite(args, "low", "high", "margin")
    if args.values is not None and args.n_trials is not None \
            and args.n_trials != len(parse_values(args.values)):
        p.error(f"--n-trials {args.n_trials} does not match the {len(parse_values(args.values))} "
                "distinct --values (each value is tried once); leave --n-trials out")
    if args.margin is not None and not args.margin > 0:
        p.error("--margin must be > 0 (added around the best trials' span)")
    if not 0 < args.heartbeat_interval < args.grace_period:
        p.error("--heartbeat-interval must be > 0 and below --grace-period")


def build_campaign(args):
    """The campaign with the flags applied to the requested phase (ConfigError if they do not
    fit it)."""
    c = _common.campaign(args)
    if args.seed is not None:
        c = dataclasses.replace(c, seed=args.seed)
    phase = c.phase(args.phase)
    changes = {k: v for k, v in (("n_trials", args.n_trials), ("repeats", args.repeats),
                                 ("sampler", args.sampler), ("pruner", args.pruner)) if v is not None}
    changes["config"] = with_config(phase.config, seed=args.train_seed,
                                    **_common.given_train_flags(args, skip=("seed",)))
    if args.low is not None or args.high is not None:
        changes["space"] = (_bounds(c, phase, args.low, args.high),)
    if args.values is not None:  # each value once, unpruned, unless the flags say otherwise
        grid = _grid(c, phase, args.values)
        changes = {**grid, "n_trials": len(next(iter(grid["grid"].values()))), "pruner": "none",
                   **changes}
    if args.top_k is not None or args.margin is not None:
        if not phase.narrow:
            raise ConfigError(f"--top-k and --margin belong to a narrowed phase; phase "
                              f"{phase.name} has its own ranges")
        changes["narrow"] = {**phase.narrow, **{k: v for k, v in
                                                (("top_k", args.top_k), ("margin", args.margin))
                                                if v is not None}}
    return validated(with_phase(c, args.phase, **changes))


def _only_param(c, phase, flag):
    space = source_space(c, phase)
    if len(space) != 1:
        raise ConfigError(f"{flag} needs a phase with one parameter; phase {phase.name} has "
                          f"{', '.join(p.name for p in space)}: set them in a campaign file")
    return space[0]


def _bounds(c, phase, low, high):
    if phase.narrow:
        raise ConfigError(f"--low/--high set a phase's own range; phase {phase.name} narrows "
                          f"{phase.narrow['from']} (use --margin, or --values)")
    p = _only_param(c, phase, "--low/--high")
    if isinstance(p, Categorical):
        raise ConfigError(f"--low/--high: {p.name} is a list of choices; use --values")
    cast = int if isinstance(p, Int) else float
    try:
        return dataclasses.replace(p, low=p.low if low is None else cast(low),
                                   high=p.high if high is None else cast(high))
    except ConfigError as e:
        raise ConfigError(f"--low/--high: {e}") from None


def _grid(c, phase, text):
    """The phase's changes for a grid over --values of its one parameter."""
    p = _only_param(c, phase, "--values")
    values = parse_values(text)
    if isinstance(p, Int):
        values = [int(v) if v.is_integer() else v for v in values]
    try:
        param = grid_param(p.name, "int" if isinstance(p, Int) else "float", values,
                           getattr(p, "log", False))
    except ConfigError as e:
        raise ConfigError(f"--values {text!r}: {e}") from None
    return {"space": (param,), "grid": {p.name: values}, "narrow": None, "sampler": "grid"}


def status(args):
    storage = open_storage(args.storage, create=False)
    name = None if args.study else (args.campaign or _common.campaign(args).name)
    report = status_report(storage, name, args.study)
    _common.emit(report, args, status_text(report))
    return 0


def confirm(args, c, phase, storage_opts):
    """A confirm phase: race the best configurations of the phases it draws from (which must
    exist), then print the verdict."""
    storage = open_storage(args.storage, create=False, **storage_opts)
    config = c.phase_config(phase)
    check_memory(config, processes=args.workers)
    data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=config.dtype)
    start = time.perf_counter()
    with _common.trial_bar(phase.n_trials, f"{c.name}-{phase.name}", args) as progress:
        study, verdict = run_confirm(c, phase.name, storage, data, workers=args.workers,
                                     storage_opts=storage_opts, progress=progress)
    summary = {"campaign": c.name, "phase": phase.name, "study": study.study_name,
               "storage": mask_url(args.storage), "verdict": verdict,
               "seconds": round(time.perf_counter() - start, 2)}
    _common.emit(summary, args, f"{study.study_name}: {verdict['sentence']}")
    return 0


def main():
    args = parse_args()
    _common.setup_logging(args)
    if args.phase == "status":
        return status(args)
    storage_opts = {"heartbeat_interval": args.heartbeat_interval, "grace_period": args.grace_period}
    c = build_campaign(args)
    phase = c.phase(args.phase)
    if phase.kind == "confirm":
        return confirm(args, c, phase, storage_opts)
    if not phase.narrow:  # data before the storage: a bad data dir must leave no storage
        spec = phase_spec(c, phase.name)
        check_storage(args.storage)
        check_memory(spec.config, processes=args.workers)
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=spec.config.dtype)
        storage = open_storage(args.storage, **storage_opts)
    else:
        storage = open_storage(args.storage, create=False, **storage_opts)
        spec = phase_spec(c, phase.name, storage)
        check_memory(spec.config, processes=args.workers)
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=spec.config.dtype)
    start = time.perf_counter()
    with _common.trial_bar(spec.n_trials, spec.study_name, args) as progress:
        study = run_spec(spec, storage, data, workers=args.workers, storage_opts=storage_opts,
                         progress=progress)
    summary = phase_summary(study, spec, mask_url(args.storage), time.perf_counter() - start)
    _common.emit(summary, args, summary_text(summary))
    return 0


if __name__ == "__main__":
    _common.run(main)

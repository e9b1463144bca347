"""Run one phase of a campaign with Optuna, or show its studies: resumable, with parallel workers.

    python scripts/search.py coarse [--config dd2424] [--campaign cifar10] [--workers 2]
    python scripts/search.py fine   [--n-trials 12 | --values 1e-3,2e-3]
    python scripts/search.py status [--campaign cifar10 | --study NAME] [--json]
    python scripts/search.py retire fine [--campaign cifar10]

PHASE is a phase of the campaign file (dd2424: coarse, fine); flags override the file. Re-running
a phase resumes it: it stops once the study holds its number of COMPLETE trials in total (pruned
and failed trials come on top; with --values, each value is tried once). Several shells or
machines may run the same command against one --storage. `retire PHASE` keeps the phase's
study (and those derived from it, and the final run) under new names and removes them from the
campaign, so that the next run derives them again (e.g. after an earlier phase changed).
"""
import dataclasses
import time

import optuna

from clr_lambda_search.model.dataset import load_cifar10
from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.resources import check_memory
from clr_lambda_search.search.campaign import MAX_MARGIN, grid_param, validated, with_phase
from clr_lambda_search.search.cli.args import (Parser, add_campaign_args, add_common_args, add_data_args,
                             add_dry_run_arg, add_heartbeat_args, add_set_arg, add_train_args,
                             storage_opts)
from clr_lambda_search.search.cli.configs import campaign, resolved, train_flag_shortcuts
from clr_lambda_search.search.cli.dry_run import dry_run
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, phase_bars, setup_logging
from clr_lambda_search.search.core import retire, run_phase
from clr_lambda_search.search.phases import require_finished
from clr_lambda_search.search.report import phase_summary, status_report, status_text, summary_text
from clr_lambda_search.search.samplers import PRUNERS, SAMPLERS
from clr_lambda_search.search.space import Categorical, Int, extremes, parse_values
from clr_lambda_search.search.study import check_storage, mask_url, open_storage


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("phase", help="a phase of the campaign (dd2424: coarse, fine, confirm), "
                                 "status, or retire")
    p.add_argument("target", nargs="?", default=None, help="retire: the phase to retire")
    add_campaign_args(p, "names the studies <campaign>-<phase> (default: the file's)")
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
    p.add_argument("--top-k", type=int, default=None,
                   help="narrowed phase: best trials spanned; confirm: configurations raced")
    p.add_argument("--margin", type=float, default=None,
                   help="narrowed phase: added on each side of the span (decades for a log "
                        "parameter, fractions of the earlier range for a linear one)")
    add_set_arg(p)
    add_dry_run_arg(p)
    add_heartbeat_args(p)
    add_train_args(p, None, skip=("seed",))
    add_data_args(p)
    add_common_args(p)
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
    if args.margin is not None and not 0 < args.margin <= MAX_MARGIN:
        p.error(f"--margin must lie in (0, {MAX_MARGIN}] (added around the best trials' span)")
    args.storage_opts = storage_opts(p, args)


def shortcuts(args, phase):
    """(flag, dotted key, value) of the flags for this phase: shortcuts of --set (docs/cli.md);
    --top-k is a narrowed phase's narrow.top_k, a confirm phase's top_k."""
    at = f"phases.{phase.name}."
    searching = "n_trials" in phase.settings
    return [("--seed", "seed", args.seed), ("--n-trials", at + "n_trials", args.n_trials),
            ("--repeats", at + "repeats", args.repeats),
            ("--sampler", at + "sampler", args.sampler), ("--pruner", at + "pruner", args.pruner),
            ("--train-seed", at + "config.seed", args.train_seed),
            ("--top-k", at + ("narrow.top_k" if searching else "top_k"), args.top_k),
            ("--margin", at + "narrow.margin", args.margin),
            *train_flag_shortcuts(args, at + "config.", skip=("seed",))]


def build_campaign(args):
    """The campaign with the flags and --set applied (ConfigError if they do not fit it); --low,
    --high and --values change the requested phase's space."""
    c = campaign(args)
    phase = c.phase(args.phase)
    flags = shortcuts(args, phase)
    if args.low is not None or args.high is not None:
        c = with_phase(c, phase.name, space=(_bounds(c, phase, args.low, args.high),))
    if args.values is not None:  # each value once, unpruned, unless the flags say otherwise
        grid = _grid(c, phase, args.values)
        c = with_phase(c, phase.name, **grid)
        at = f"phases.{phase.name}."
        flags = [("--values", at + "n_trials", len(next(iter(grid["grid"].values())))),
                 ("--values", at + "pruner", "none"), *flags]
    return validated(resolved(args, flags, c)[0])


def _only_param(c, phase, flag):
    if "n_trials" not in phase.settings:
        raise ConfigError(f"{flag} sets a search phase's parameter; phase {phase.name} confirms "
                          "the configurations of earlier phases")
    space = phase.base_space(c)
    if len(space) != 1:
        raise ConfigError(f"{flag} needs a phase with one parameter; phase {phase.name} has "
                          f"{', '.join(p.name for p in space)}: set them in a campaign file")
    return space[0]


def _bounds(c, phase, low, high):
    if getattr(phase, "narrow", None):
        raise ConfigError(f"--low/--high set a phase's own range; phase {phase.name} narrows "
                          f"{phase.narrow['from']} (use --margin, or --values)")
    p = _only_param(c, phase, "--low/--high")
    if isinstance(p, Categorical):
        raise ConfigError(f"--low/--high: {p.name} is a list of choices; use --values")
    cast = int if isinstance(p, Int) else float
    try:
        bounded = dataclasses.replace(p, low=p.low if low is None else cast(low),
                                      high=p.high if high is None else cast(high))
        _check_values(c.phase_config(phase), p.name, extremes(bounded))
        return bounded
    except ConfigError as e:
        raise ConfigError(f"--low/--high: {e}") from None



def _check_values(config, name, values):
    """TrainConfig's ConfigError unless field `name` may take each value: a flag's range is
    refused before a study exists, not by its first trial."""
    for value in values:
        dataclasses.replace(config, **{name: value})


def _grid(c, phase, text):
    """The phase's changes for a grid over --values of its one parameter."""
    p = _only_param(c, phase, "--values")
    values = parse_values(text)
    if isinstance(p, Int):
        values = [int(v) if v.is_integer() else v for v in values]
    try:
        param = grid_param(p.name, "int" if isinstance(p, Int) else "float", values,
                           getattr(p, "log", False))
        _check_values(c.phase_config(phase), p.name, values)
    except ConfigError as e:
        raise ConfigError(f"--values {text!r}: {e}") from None
    return {"space": (param,), "grid": {p.name: values}, "narrow": None, "sampler": "grid"}


def status(args):
    if args.set:  # checked against the campaign, as on every command
        resolved(args)
    storage = open_storage(args.storage, create=False)
    name = None if args.study else (args.campaign or campaign(args).name)
    report = status_report(storage, name, args.study)
    emit(report, args, status_text(report))
    return 0


def retire_phase(args):
    if not args.target:
        raise ConfigError("retire which phase? give the target phase, e.g. "
                          "scripts/search.py retire fine")
    c = build_retire_campaign(args)
    storage = open_storage(args.storage, create=False)
    kept = retire(c, args.target, storage)
    emit({"campaign": c.name, "phase": args.target, "retired": kept}, args,
         f"retired {', '.join(kept) or 'nothing (no study of that phase yet)'}; the next run "
         "derives them again")
    return 0


def build_retire_campaign(args):
    c = resolved(args)[0]
    c.phase(args.target)
    return c


def main():
    args = parse_args()
    setup_logging(args)
    if args.dry_run and args.phase in ("status", "retire"):  # retire writes: never by surprise
        raise ConfigError(f"--dry-run runs nothing of a phase; {args.phase} takes no --dry-run")
    if args.phase == "status":
        return status(args)
    if args.phase == "retire":
        return retire_phase(args)
    storage_opts = args.storage_opts
    c = build_campaign(args)
    phase = c.phase(args.phase)
    if args.dry_run:
        return dry_run(args, c, [phase.name])
    config = c.phase_config(phase)
    if not phase.upstream():  # data before the storage: a bad data dir must leave no storage
        check_storage(args.storage)
        for corner in c.phase_configs(phase):  # the largest trial the space allows
            check_memory(corner, processes=args.workers)
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=config.dtype)
        storage = open_storage(args.storage, **storage_opts)
    else:  # derived from earlier phases: their storage must exist
        storage = open_storage(args.storage, create=False, **storage_opts)
        if phase.study_name(c.name) not in optuna.get_all_study_names(storage):
            for source in phase.upstream():  # not derivable: say so before loading the data
                require_finished(storage, c, source, phase.name)
        for corner in c.phase_configs(phase):  # the largest trial the space allows
            check_memory(corner, processes=args.workers)
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=config.dtype)
    start = time.perf_counter()
    with phase_bars(args) as progress:
        study, _ = run_phase(c, phase.name, data, storage, workers=args.workers,
                             storage_opts=storage_opts, progress=progress)
    summary = phase_summary(study, mask_url(args.storage), time.perf_counter() - start)
    emit(summary, args, summary_text(summary))
    return 0


if __name__ == "__main__":
    run(main)

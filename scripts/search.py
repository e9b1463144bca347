"""Search λ with Optuna: coarse and fine phases into one storage, resumable, with parallel workers.

    python scripts/search.py coarse [--campaign cifar10] [--n-trials 10] [--workers 2]
    python scripts/search.py fine   [--campaign cifar10] [--n-trials 12 | --values 1e-3,2e-3]
    python scripts/search.py status [--campaign cifar10]

Re-running a phase resumes it: it stops once the study holds --n-trials COMPLETE trials in total
(pruned and failed trials come on top; with --values, each value is tried once).
Several shells or machines may run the same command against one --storage.
"""
import time

import _common
from model.data import load_cifar10
from model.resources import check_memory
from search.phases import (DEFAULT_SAMPLER, DEFAULT_TRIALS, SEARCH_CONFIG, PhaseSpec, coarse_space,
                           make_fine_spec, run_phase)
from search.report import phase_summary, status_report, status_text, summary_text
from search.runner import PRUNERS, SAMPLERS
from search.space import FINE_MARGIN_DECADES, FINE_TOP_K, parse_values
from search.study import (GRACE_PERIOD, HEARTBEAT_INTERVAL, check_storage, mask_url,
                          open_storage)


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("coarse", "fine", "status"), help="what to run")
    p.add_argument("--campaign", default="cifar10", help="names the studies <campaign>-coarse/-fine")
    p.add_storage()
    p.add_argument("--n-trials", type=int, default=None,
                   help="finished trials the phase ends with (default: coarse 10, fine 12)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--repeats", type=int, default=1, help="seeds trained per λ (mean is the objective)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of the study (training seed: --train-seed)")
    p.add_argument("--train-seed", type=int, default=0, help="first training seed of every trial")
    p.add_argument("--sampler", choices=SAMPLERS[:2], default=None,
                   help="default: random for coarse (as the report), tpe for fine")
    p.add_argument("--pruner", choices=PRUNERS, default=None,
                   help="prune at half cycles (default median; none with --values)")
    p.add_argument("--low", type=float, default=None, help="coarse λ lower bound (default 1e-5)")
    p.add_argument("--high", type=float, default=None, help="coarse λ upper bound (default 1e-1)")
    p.add_argument("--values", default=None, help="fine: an explicit comma-separated λ list (grid)")
    p.add_argument("--top-k", type=int, default=FINE_TOP_K, help="fine: coarse trials spanned")
    p.add_argument("--margin", type=float, default=FINE_MARGIN_DECADES,
                   help="fine: decades added on each side of the span")
    p.add_argument("--heartbeat-interval", type=int, default=HEARTBEAT_INTERVAL, help="seconds")
    p.add_argument("--grace-period", type=int, default=GRACE_PERIOD,
                   help="seconds after which a silent RUNNING trial is failed and retried")
    _common.add_train_args(p, SEARCH_CONFIG, skip=("lam", "seed"))
    _common.add_data_args(p)
    _common.add_common_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    p.require_positive(args, "n_trials", "workers", "repeats")
    p.require_workers(args)
    p.require_seed(args, "seed")
    p.require_repeats(args)
    p.require_seed(args, "train_seed", count=args.repeats)
    p.require_finite(args, "low", "high", "margin")
    if args.values is not None and args.phase != "fine":
        p.error("--values belongs to the fine phase")
    if args.values is not None and args.n_trials is not None \
            and args.n_trials != len(parse_values(args.values)):
        p.error(f"--n-trials {args.n_trials} does not match the {len(parse_values(args.values))} "
                "distinct --values (each value is tried once); leave --n-trials out")
    if not (args.top_k >= 1 and args.margin > 0):
        p.error("--top-k must be ≥ 1 and --margin > 0 (decades added around the best λ)")
    if not 0 < args.heartbeat_interval < args.grace_period:
        p.error("--heartbeat-interval must be > 0 and below --grace-period")


def build_spec(args, storage):
    """The PhaseSpec of the requested phase, plus the derived fine range (None otherwise)."""
    pruner = args.pruner or ("none" if args.values else "median")
    common = dict(campaign=args.campaign, config=_common.train_config(args, seed=args.train_seed),
                  pruner=pruner, repeats=args.repeats, seed=args.seed)
    if args.phase == "coarse":
        return PhaseSpec(phase="coarse", n_trials=args.n_trials or DEFAULT_TRIALS["coarse"],
                         space=coarse_space(args.low, args.high),
                         sampler=args.sampler or DEFAULT_SAMPLER["coarse"], **common), None
    values = parse_values(args.values) if args.values is not None else None
    return make_fine_spec(storage, n_trials=args.n_trials, sampler=args.sampler, values=values,
                          top_k=args.top_k, margin=args.margin, **common)


def main():
    args = parse_args()
    _common.setup_logging(args)
    storage_opts = {"heartbeat_interval": args.heartbeat_interval, "grace_period": args.grace_period}
    if args.phase == "status":
        storage = open_storage(args.storage, create=False, **storage_opts)
        report = status_report(storage, args.campaign)
        _common.emit(report, args, status_text(report))
        return 0
    if args.phase == "coarse":  # data before the storage: a bad data dir must leave no storage
        spec, info = build_spec(args, None)
        check_storage(args.storage)
        check_memory(spec.config, processes=args.workers)
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=spec.config.dtype)
        storage = open_storage(args.storage, **storage_opts)
    else:
        storage = open_storage(args.storage, create=False, **storage_opts)
        spec, info = build_spec(args, storage)
        check_memory(spec.config, processes=args.workers)
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=spec.config.dtype)
    start = time.perf_counter()
    with _common.trial_bar(spec.n_trials, spec.study_name, args) as progress:
        study = run_phase(spec, storage, args.storage, data, workers=args.workers,
                          storage_opts=storage_opts, progress=progress, fine_range=info)
    summary = phase_summary(study, spec, mask_url(args.storage), time.perf_counter() - start)
    _common.emit(summary, args, summary_text(summary))
    return 0


if __name__ == "__main__":
    _common.run(main)

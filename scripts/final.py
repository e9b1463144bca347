"""Train the campaign's best λ with the final protocol and evaluate it once on the test set.

    python scripts/final.py [--campaign cifar10] [--lam 0.001] [--seeds 3] [--workers 2] [--json]

λ comes from the fine study's best trial (else the coarse study's), or --lam. Trains on 49k/1k
with n_s = 2·⌊49,000/100⌋ = 980 for 3 cycles per seed; writes params, histories, config,
metrics and figures into studies/<campaign>/final/ (or --out).
"""
import dataclasses
import os

import _common
from model.data import load_cifar10
from model.outputs import check_results_dir
from model.resources import check_memory, check_writable
from model.schedule import step_size
from model.train import TrainConfig
from search.final import run_final
from search.phases import best_lam
from search.study import load_study, open_storage


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--campaign", default="cifar10", help="whose studies give the best λ")
    p.add_storage()
    p.add_argument("--lam", type=float, default=None, help="use this λ instead of the studies'")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (test acc mean ± std)")
    p.add_argument("--seed", type=int, default=0, help="the first training seed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes the seeds train in, at once (default: cores)")
    p.add_argument("--n-s", type=int, default=None,
                   help="CLR half cycle (default 2·⌊n_train / n_batch⌋ = 980 on 49k)")
    p.add_argument("--out", default=None, help="results folder (default studies/<campaign>/final)")
    _common.add_train_args(p, skip=("lam", "seed", "n_s"))
    _common.add_data_args(p)
    _common.add_common_args(p)
    args = p.parse_args(argv)
    p.require_positive(args, "seeds", "workers")
    p.require_workers(args)
    p.require_seed(args, "seed", count=args.seeds)
    if args.lam is not None and not args.lam >= 0:
        p.error(f"--lam must be ≥ 0 (got {args.lam})")
    return args


def choose_lam(args):
    """(λ, source, storage or None)."""
    if args.lam is not None:
        return args.lam, {"study": None, "phase": "given", "trial": None}, None
    storage = open_storage(args.storage, create=False)
    lam, source = best_lam(storage, args.campaign)
    return lam, source, storage


def main():
    args = parse_args()
    _common.setup_logging(args)
    out = args.out or f"studies/{args.campaign}/final"
    protect = _common.protected_paths(args.storage)
    check_results_dir(out, protect)
    check_writable(out)
    lam, source, storage = choose_lam(args)
    # checked before the data is loaded; n_s defaults to 2 epochs of the training split
    config = _common.train_config(args, lam=lam, seed=args.seed,
                                  n_s=args.n_s if args.n_s is not None else TrainConfig().n_s)
    check_memory(config, processes=args.seeds if args.workers > 1 else 1)  # all seeds at once
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    if args.n_s is None:
        config = dataclasses.replace(config, n_s=step_size(len(data.train.y), args.n_batch))
    seeds = [args.seed + k for k in range(args.seeds)]
    study = load_study(storage, source["study"]) if storage is not None else None
    with _common.single_blas_thread(), _common.progress_bar(
            config.total_steps * len(seeds), "final run", args, "update") as progress:
        metrics, runs = run_final(data, config, seeds, lam, source, out, study, args.workers,
                                  protect=protect, progress=progress)
    summary = {"lam": lam, "source": source, "test_acc": [r["test"]["acc"] for r in runs],
               "test_acc_mean": metrics["test_acc_mean"], "test_acc_std": metrics["test_acc_std"],
               "seeds": seeds, "out": str(out)}
    where = (f"{source['study']} trial #{source['trial']}" if source["study"] else "--lam")
    per_seed = ", ".join(f"seed {r['seed']}: {r['test']['acc']:.4f}" for r in runs)
    _common.emit(summary, args,
                 f"λ = {lam:.4g} (from {where}); test accuracy {metrics['test_acc_mean']:.4f} ± "
                 f"{metrics['test_acc_std']:.4f} over {len(seeds)} seeds ({per_seed}) -> {out}")
    return 0


if __name__ == "__main__":
    _common.run(main)

"""Train the campaign's best parameters with the final protocol and test them once.

    python scripts/final.py [--config dd2424] [--campaign cifar10] [--lam 0.001] [--seeds 3] [--json]

The parameters come from the campaign's best trial (its last phase with a complete trial); a
TrainConfig flag (--lam, --m, …) wins over them and over the campaign's final section, and when
the flags give every searched parameter no study is read. dd2424: trains on 49k/1k with n_s =
2·⌊49,000/n_batch⌋ = 980 for 3 cycles per seed; writes params, histories, config, metrics and
figures into studies/<campaign>/final/ (or --out).
"""
import dataclasses
import os

import _common
from model.dataset import load_cifar10
from model.outputs import check_results_dir
from model.resources import check_memory, check_writable
from search.campaign import final_config, searched_names, with_config
from search.final import check_final_study, run_final
from search.phases import campaign_best
from search.space import format_params
from search.study import open_storage

N_TRAIN = 49_000  # to check the flags before the data is loaded; the real count replaces it


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    _common.add_campaign_args(p, "whose studies give the best parameters (default: the file's)")
    p.add_storage()
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds (test acc mean ± std; default: the campaign's, 3)")
    p.add_argument("--seed", type=int, default=0, help="the first training seed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes the seeds train in, at once (default: cores)")
    p.add_argument("--out", default=None, help="results folder (default studies/<campaign>/final)")
    p.add_argument("--force-final", action="store_true",
                   help="replace a recorded final run whose pick differs from this one")
    _common.add_train_args(p, None, skip=("seed",))
    _common.add_data_args(p)
    _common.add_common_args(p)
    args = p.parse_args(argv)
    p.require_positive(args, "seeds", "workers")
    p.require_workers(args)
    p.require_seed(args, "seed", count=args.seeds or 1)
    return args


def build_campaign(args):
    """The campaign with the flags in its final section (they win over the best parameters)."""
    c = _common.campaign(args)
    given = _common.given_train_flags(args, skip=("seed",))
    final = dataclasses.replace(c.final, config=with_config(c.final.config, **given),
                                seeds=args.seeds or c.final.seeds,
                                n_s=given.get("n_s", c.final.n_s))
    return dataclasses.replace(c, final=final), given


def choose_params(c, given, storage_url):
    """(best params, source, storage or None): the campaign's best trial, unless the flags give
    every parameter its phases search."""
    if set(searched_names(c)) <= set(given):
        return {}, {"study": None, "phase": "given", "trial": None}, None
    storage = open_storage(storage_url, create=False)
    params, source = campaign_best(storage, c.name)
    return params, source, storage


def main():
    args = parse_args()
    _common.setup_logging(args)
    c, given = build_campaign(args)
    out = args.out or f"studies/{c.name}/final"
    protect = _common.protected_paths(args.storage)
    check_results_dir(out, protect)
    check_writable(out)
    params, source, storage = choose_params(c, given, args.storage)
    config = final_config(c, params, N_TRAIN)  # a bad flag fails before the data is loaded
    check_memory(config, processes=c.final.seeds if args.workers > 1 else 1)  # all seeds at once
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    config = dataclasses.replace(final_config(c, params, len(data.train.y)), seed=args.seed)
    trained = {k: getattr(config, k) for k in searched_names(c)}
    seeds = [args.seed + k for k in range(c.final.seeds)]
    if storage is not None:
        check_final_study(storage, c.name, trained, force=args.force_final)
    with _common.single_blas_thread(), _common.progress_bar(
            config.total_steps * len(seeds), "final run", args, "update") as progress:
        metrics, runs = run_final(data, config, seeds, trained, source, out, storage, c.name,
                                  workers=args.workers, protect=protect, progress=progress)
    summary = {"params": trained, "source": source, "test_acc": [r["test"]["acc"] for r in runs],
               "test_acc_mean": metrics["test_acc_mean"], "test_acc_std": metrics["test_acc_std"],
               "test_acc_ensemble_mean": metrics["test_acc_ensemble_mean"],
               "seeds": seeds, "out": str(out)}
    where = ("the flags" if not source["study"] else f"{source['study']}, confirmed"
             if source["trial"] is None else f"{source['study']} trial #{source['trial']}")
    per_seed = ", ".join(f"seed {r['seed']}: {r['test']['acc']:.4f}" for r in runs)
    _common.emit(summary, args,
                 f"{format_params(trained)} (from {where}); test accuracy "
                 f"{metrics['test_acc_mean']:.4f} ± {metrics['test_acc_std']:.4f} over "
                 f"{len(seeds)} seeds ({per_seed}); snapshot ensembles "
                 f"{metrics['test_acc_ensemble_mean']:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    _common.run(main)

"""Train the campaign's best parameters with the final protocol and test them once.

    python scripts/final.py [--config dd2424] [--campaign cifar10] [--lam 0.001] [--seeds 3] [--json]

The parameters come from the campaign's best trial (its last phase with a complete trial); a
TrainConfig flag (--lam, --m, …) wins over them and over the campaign's final section, and when
the flags give every searched parameter no search study is read. The run is recorded as the study
<campaign>-final (its seeds are queued trials: several machines may run the same command). dd2424: trains on 49k/1k with n_s =
2·⌊49,000/n_batch⌋ = 980 for 3 cycles per seed; writes params, histories, config, metrics and
figures into studies/<campaign>/final/ (or --out).
"""
import os

from clr_lambda_search.model.dataset import load_cifar10
from clr_lambda_search.model.outputs import check_results_dir
from clr_lambda_search.model.resources import check_memory, check_writable
from clr_lambda_search.search.cli.args import (Parser, add_campaign_args, add_common_args, add_data_args,
                             add_dry_run_arg, add_set_arg, add_train_args)
from clr_lambda_search.search.cli.configs import (check_final_processes, resolved,
                                                 train_flag_shortcuts)
from clr_lambda_search.search.cli.dry_run import dry_run
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, phase_bars, setup_logging
from clr_lambda_search.search.cli.storage import protected_paths
from clr_lambda_search.search.cli.threads import single_blas_thread
from clr_lambda_search.search.core import campaign_best, run_context, run_final
from clr_lambda_search.search.space import format_params
from clr_lambda_search.search.study import check_storage, open_storage, outputs_dir

N_TRAIN = 49_000  # to check the flags before the data is loaded; the real count replaces it


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_campaign_args(p, "whose studies give the best parameters (default: the file's)")
    p.add_storage()
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds (test acc mean ± std; default: the campaign's, 3)")
    p.add_argument("--seed", type=int, default=0, help="the first training seed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes the seeds train in, at once (default: cores)")
    p.add_argument("--out", default=None, help="results folder (default studies/<campaign>/final; studies/<campaign>-<digest>/final for a storage other than the default)")
    p.add_argument("--force-final", action="store_true",
                   help="retire a recorded final run whose pick differs from this one (it is "
                        "kept as a study of its own) and train this one")
    add_set_arg(p, "final.seeds=5, final.lam=0.001")
    add_dry_run_arg(p)
    add_train_args(p, None, skip=("seed",))
    add_data_args(p)
    add_common_args(p)
    args = p.parse_args(argv)
    p.require_positive(args, "seeds", "workers")
    p.require_workers(args)
    p.require_seed(args, "seed", count=args.seeds or 1)
    return args


def build_campaign(args):
    """(campaign, given): the campaign with the flags and --set in its final section (they win
    over the best parameters), and {field: value} of the TrainConfig values they gave."""
    flags = [("--seeds", "final.seeds", args.seeds),
             *train_flag_shortcuts(args, "final.", skip=("seed",))]
    c, overrides = resolved(args, flags)
    given = {key.split(".", 1)[1]: value for key, value in overrides.items()
             if key.startswith("final.") and key != "final.seeds"}
    return c, given


def given_pick(c, given):
    """The flags' values of every searched parameter, or None when some are not given (the
    campaign's studies give them)."""
    names = c.searched_names()
    return {k: given[k] for k in names} if set(names) <= set(given) else None


def main():
    args = parse_args()
    setup_logging(args)
    c, given = build_campaign(args)
    check_final_processes(c, args.workers)
    if args.dry_run:
        return dry_run(args, c, ["final"], pick=given_pick(c, given))
    out = args.out or outputs_dir(c.name, args.storage) / "final"
    protect = protected_paths(args.storage)
    check_results_dir(out, protect)
    check_writable(out)
    pick, source = given_pick(c, given), None
    if pick is None:  # the campaign's best, before the data is loaded (none: one line)
        storage = open_storage(args.storage, create=False)
        pick, source = campaign_best(run_context(c, None, storage))
    else:
        check_storage(args.storage)
    config = c.final.training_config(c, pick or {}, N_TRAIN)  # a bad flag fails before the data
    check_memory(config, processes=c.final.seeds if args.workers > 1 else 1)  # all seeds at once
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    if source is None:
        storage = open_storage(args.storage)
    with single_blas_thread(), phase_bars(args) as progress:
        metrics, trained, source = run_final(
            c, data, storage, pick=pick, source=source, out=out, first_seed=args.seed, workers=args.workers,
            protect=protect, force=args.force_final, progress=progress)
    seeds = [s["seed"] for s in metrics["seeds"]]
    summary = {"params": metrics["params"], "source": metrics["source"],
               "test_acc": [s["test_acc"] for s in metrics["seeds"]],
               "test_acc_mean": metrics["test_acc_mean"], "test_acc_std": metrics["test_acc_std"],
               "test_acc_ensemble_mean": metrics["test_acc_ensemble_mean"],
               "seeds": seeds, "out": str(out)}
    src = metrics["source"] or {}
    where = ("the flags" if not src.get("study") else f"{src['study']}, confirmed"
             if src.get("trial") is None else f"{src['study']} trial #{src['trial']}")
    per_seed = ", ".join(f"seed {s['seed']}: {s['test_acc']:.4f}" for s in metrics["seeds"])
    emit(summary, args,
         f"{format_params(metrics['params'])} (from {where}); test accuracy "
         f"{metrics['test_acc_mean']:.4f} ± {metrics['test_acc_std']:.4f} over "
         f"{len(seeds)} seeds ({per_seed}); snapshot ensembles "
         f"{metrics['test_acc_ensemble_mean']:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    run(main)

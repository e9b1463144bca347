"""The main job: gradient check → every search phase of a campaign → final run → dashboard.

    python scripts/pipeline.py [--config dd2424] [--campaign cifar10] [--workers 2] [--json]

The campaign file (default: the shipped dd2424.toml, the report's protocol) names the phases;
flags override it. Everything goes to one storage (default sqlite:///studies/studies.db) and
studies/<campaign>/. Re-running resumes: finished phases are skipped, an interrupted phase
continues where it stopped, and the final run is redone only if its settings changed.
"""
import logging
import os
import time
from pathlib import Path

from clr_lambda_search.model.dataset import load_cifar10
from clr_lambda_search.model.outputs import check_page, check_results_dir
from clr_lambda_search.model.resources import check_memory, check_writable
from clr_lambda_search.search.cli.args import (Parser, add_campaign_args, add_common_args, add_data_args,
                             add_dry_run_arg, add_heartbeat_args, add_set_arg, storage_opts)
from clr_lambda_search.search.cli.configs import check_final_processes, campaign, resolved
from clr_lambda_search.search.cli.dry_run import dry_run
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, phase_bars, setup_logging
from clr_lambda_search.search.cli.storage import protected_paths
from clr_lambda_search.search.cli.threads import single_blas_thread
from clr_lambda_search.search.core import dashboard_maker, run_campaign
from clr_lambda_search.search.space import format_params
from clr_lambda_search.search.study import check_storage, mask_url, open_storage, outputs_dir

log = logging.getLogger("pipeline")
N_TRAIN = 49_000  # to check the final settings before the data is loaded


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_campaign_args(p, "names the studies and studies/<campaign>/ (default: the file's)")
    p.add_storage()
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes for the searches and the final seeds (default: cores)")
    p.add_argument("--coarse-trials", type=int, default=None, help="trials of the phase 'coarse'")
    p.add_argument("--fine-trials", type=int, default=None, help="trials of the phase 'fine'")
    p.add_argument("--repeats", type=int, default=None, help="seeds per trial in every phase")
    p.add_argument("--pruner", default=None, help="pruner of every phase (none, median, hyperband, "
                                                  "or an optuna.pruners class name)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed of the studies")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the final run")
    p.add_argument("--search-n-s", type=int, default=None, help="search: CLR half cycle")
    p.add_argument("--search-cycles", type=int, default=None, help="search: cycles")
    p.add_argument("--final-n-s", type=int, default=None,
                   help="final: CLR half cycle (dd2424: 2 epochs, 2·⌊n_train/n_batch⌋ = 980)")
    p.add_argument("--final-cycles", type=int, default=None, help="final: cycles")
    p.add_argument("--out-dir", default=None, help="results folder (default studies/<campaign>; studies/<campaign>-<digest> for a storage other than the default)")
    p.add_argument("--force-final", action="store_true",
                   help="retire a recorded final run whose pick differs from the search's (it is "
                        "kept as a study of its own) and train the new pick")
    add_set_arg(p, "phases.coarse.n_trials=4, search.n_s=20, final.seeds=5")
    add_dry_run_arg(p)
    add_heartbeat_args(p)
    add_data_args(p)
    add_common_args(p)
    args = p.parse_args(argv)
    args.storage_opts = storage_opts(p, args)
    p.require_positive(args, "workers", "coarse_trials", "fine_trials", "repeats", "seeds")
    p.require_workers(args)
    if args.seed is not None:
        p.require_seed(args, "seed")
    if args.repeats is not None:
        p.require_repeats(args)
    return args


def shortcuts(args, c):
    """(flag, dotted key, value) of the flags: shortcuts of --set (docs/cli.md)."""
    out = [("--search-n-s", "search.n_s", args.search_n_s),
           ("--search-cycles", "search.cycles", args.search_cycles), ("--seed", "seed", args.seed),
           ("--seeds", "final.seeds", args.seeds), ("--final-n-s", "final.n_s", args.final_n_s),
           ("--final-cycles", "final.cycles", args.final_cycles),
           ("--coarse-trials", "phases.coarse.n_trials", args.coarse_trials),
           ("--fine-trials", "phases.fine.n_trials", args.fine_trials)]
    for phase in c.phases:  # --repeats and --pruner: every phase that has them
        for key in ("repeats", "pruner"):
            if key in phase.settings:
                out.append((f"--{key}", f"phases.{phase.name}.{key}", getattr(args, key)))
    return out


def build_campaign(args):
    """The campaign file with the flags and --set applied; ConfigError when they do not fit it."""
    c = campaign(args)
    return resolved(args, shortcuts(args, c), c)[0]


def summary_text(s):
    f = s["final"]
    lines = [f"campaign {s['campaign']} ({s['storage']}), {s['seconds']:.0f} s",
             f"  gradient check: max relative error {s['gradcheck']['max_rel_error']:.1e}"]
    for ph in s["phases"]:
        b = ph["best"]
        lines.append(f"  {ph['study']}: {ph['spec']}; best "
                     + (f"{format_params(b['params'])}, val acc {b['val_acc']:.4f}" if b else "—"))
    if s["verdict"]:
        lines.append(f"  verdict: {s['verdict']['sentence']}")
    products = f" ({f['precision']} products)" if f.get("precision") else ""
    lines += [f"  final {format_params(f['params'])}{products}: test accuracy "
              f"{f['test_acc_mean']:.4f} ± {f['test_acc_std']:.4f} over {len(f['test_acc'])} seeds "
              f"{f['test_acc']}",
              f"  outputs: {s['outputs']['final']}/ (params, histories, metrics, figures), "
              f"{s['outputs']['dashboard']}"]
    return "\n".join(lines)


def summary_of(result, storage_text):
    """The --json summary of a CampaignResult."""
    f = result.final
    return {"campaign": result.campaign, "storage": storage_text, "gradcheck": result.gradcheck,
            "phases": [{k: ph[k] for k in ("study", "space", "spec", "narrowed", "best")}
                       for ph in result.phases],
            "verdict": result.verdict,
            "final": {"params": f["params"], "source": f["source"],
                      "test_acc": [s["test_acc"] for s in f["seeds"]],
                      "test_acc_mean": f["test_acc_mean"], "test_acc_std": f["test_acc_std"],
                      "precision": f.get("precision")},
            "outputs": result.outputs, "seconds": result.seconds}


def main():
    args = parse_args()
    setup_logging(args)
    c = build_campaign(args)
    check_final_processes(c, args.workers)
    if args.dry_run:
        return dry_run(args, c, [p.name for p in c.phases] + ["final"], gradcheck=True)
    out_dir = Path(args.out_dir or outputs_dir(c.name, args.storage))
    protect = protected_paths(args.storage)
    check_results_dir(out_dir / "final", protect)  # both outputs, before any work
    check_page(out_dir / "dashboard.html", protect)
    check_writable(out_dir, flag="--out-dir")
    check_storage(args.storage)
    for phase in c.phases:  # at every corner of its space: the largest trial it allows
        for config in c.phase_configs(phase):
            check_memory(config, processes=args.workers)
    check_memory(c.final.training_config(c, {}, N_TRAIN),
                 processes=c.final.seeds if args.workers > 1 else 1)
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    storage = open_storage(args.storage, **args.storage_opts)

    def step(i, n, text):
        log.info("[%d/%d] %s", i, n, text)
    with single_blas_thread(), phase_bars(args) as progress:
        result = run_campaign(c, data, storage, workers=args.workers, out_dir=out_dir,
                              protect=protect, force_final=args.force_final, progress=progress,
                              storage_opts=args.storage_opts,
                              on_step=step, make_dashboard=dashboard_maker(
                                  c.name, storage, mask_url(args.storage)))
    summary = summary_of(result, mask_url(args.storage))
    emit(summary, args, summary_text(summary))
    return 0


if __name__ == "__main__":
    run(main)

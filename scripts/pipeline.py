"""The main job: gradient check → coarse search → fine search → final run → dashboard.

    python scripts/pipeline.py [--campaign cifar10] [--workers 2] [--data-dir DIR] [--json]

Everything goes to one storage (default sqlite:///studies/studies.db) and studies/<campaign>/.
Re-running resumes: finished phases are skipped, an interrupted phase continues where it stopped,
and the final run is redone only if the best λ or its settings changed.
"""
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np

import _common
from model.checkpoint import save_page
from model.data import load_cifar10
from model.resources import check_memory, check_writable
from model.errors import DivergedError
from model.gradcheck import gradcheck_report
from model.outputs import check_page, check_results_dir
from model.schedule import step_size
from model.train import TrainConfig
from search.final import read_final, run_final
from search.phases import (DEFAULT_TRIALS, SEARCH_CONFIG, PhaseSpec, best_lam, coarse_space,
                           make_fine_spec, run_phase)
from search.report import best_row
from search.runner import PRUNERS
from search.study import (campaign_studies, check_storage, load_study, mask_url,
                          open_storage)

log = logging.getLogger("pipeline")


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--campaign", default="cifar10", help="names the studies and studies/<campaign>/")
    p.add_storage()
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes for the searches and the final seeds (default: cores)")
    p.add_argument("--coarse-trials", type=int, default=DEFAULT_TRIALS["coarse"])
    p.add_argument("--fine-trials", type=int, default=DEFAULT_TRIALS["fine"])
    p.add_argument("--repeats", type=int, default=1, help="seeds per λ in the searches")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of the studies")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the final run")
    p.add_argument("--search-n-s", type=int, default=SEARCH_CONFIG.n_s, help="search: CLR half cycle")
    p.add_argument("--search-cycles", type=int, default=SEARCH_CONFIG.cycles, help="search: cycles")
    p.add_argument("--final-n-s", type=int, default=None,
                   help="final: CLR half cycle (default 2·⌊n_train/100⌋ = 980)")
    p.add_argument("--final-cycles", type=int, default=TrainConfig().cycles, help="final: cycles")
    p.add_argument("--out-dir", default=None, help="results folder (default studies/<campaign>)")
    _common.add_data_args(p)
    _common.add_common_args(p)
    args = p.parse_args(argv)
    p.require_positive(args, "workers", "coarse_trials", "fine_trials", "repeats", "seeds")
    p.require_workers(args)
    p.require_seed(args, "seed")
    p.require_repeats(args)
    return args


def configs(args):
    """(search config, final config without λ); ConfigError on bad values. Without --final-n-s
    the final n_s is TrainConfig's until the data size is known (see final_n_s)."""
    search = dataclasses.replace(SEARCH_CONFIG, n_s=args.search_n_s, cycles=args.search_cycles)
    final = TrainConfig(n_s=args.final_n_s if args.final_n_s is not None else TrainConfig().n_s,
                        cycles=args.final_cycles)
    return search, final


def final_n_s(args, final, n_train):
    """The final config with n_s = 2·⌊n_train / n_batch⌋ unless --final-n-s was given."""
    if args.final_n_s is not None:
        return final
    return dataclasses.replace(final, n_s=step_size(n_train, final.n_batch))


def gradient_check(data):
    report = gradcheck_report(data.train.X, data.train.y, np.random.default_rng(0))
    worst = max(e for c in report["checks"] for e in c["max_rel_error"].values())
    log.info("[1/5] gradient check: max relative error %.2e (%s)", worst,
             "pass" if report["passed"] else "FAIL")
    if not report["passed"]:
        raise DivergedError(f"gradient check failed (max relative error {worst:.2e} ≥ 1e-5)")
    return {"passed": True, "max_rel_error": worst}


def search_phases(args, storage, data, search_config):
    common = dict(campaign=args.campaign, config=search_config, pruner=args.pruner,
                  repeats=args.repeats, seed=args.seed)
    opts = dict(workers=args.workers)
    coarse = PhaseSpec(phase="coarse", n_trials=args.coarse_trials, space=coarse_space(),
                       sampler="random", **common)
    log.info("[2/5] coarse search: %d trials", coarse.n_trials)
    with _common.trial_bar(coarse.n_trials, coarse.study_name, args) as progress:
        coarse_study = run_phase(coarse, storage, args.storage, data, progress=progress, **opts)
    fine, info = make_fine_spec(storage, n_trials=args.fine_trials, **common)
    log.info("[3/5] fine search: %d trials in λ ∈ [%.3g, %.3g]", fine.n_trials, fine.space[0].low,
             fine.space[0].high)
    with _common.trial_bar(fine.n_trials, fine.study_name, args) as progress:
        fine_study = run_phase(fine, storage, args.storage, data, progress=progress,
                               fine_range=info, **opts)
    return coarse_study, fine_study


def final_phase(args, storage, data, final_base, out, protect, on_cpu_free=None):
    lam, source = best_lam(storage, args.campaign)
    config = dataclasses.replace(final_base, lam=lam)
    seeds = list(range(args.seeds))
    done = read_final(out)
    if done and done["metrics"]["lam"] == lam and done["config"] == {
            **dataclasses.asdict(config), "data": data.source, "seeds": seeds}:
        log.info("[4/5] final run: already done for λ = %.4g, skipped", lam)
        return done["metrics"]
    log.info("[4/5] final run: λ = %.4g from %s, %d seeds × %d updates", lam, source["study"],
             len(seeds), config.total_steps)
    with _common.progress_bar(config.total_steps * len(seeds), "final run", args,
                              "update") as progress:
        metrics, _ = run_final(data, config, seeds, lam, source, out,
                               load_study(storage, source["study"]), workers=args.workers,
                               on_cpu_free=on_cpu_free, protect=protect, progress=progress)
    return metrics


def dashboard_maker(args, storage):
    """A callable returning the campaign's search.plots.Dashboard, made (the studies' sections
    rendered) at its first call. The pipeline calls it first while the final run's last seed
    trains and a CPU is free: the plotting modules (~0.7 s to import, so imported only here) and
    the studies' figures then cost no wall time. A call that failed is made again (and raises) when
    the page is written, after the final run's results are saved."""
    @functools.cache
    def dashboard():
        from search.plots import Dashboard

        return Dashboard(args.campaign, mask_url(args.storage),
                         campaign_studies(storage, args.campaign))
    return dashboard


def write_dashboard(dashboard, out_dir, protect):
    path = out_dir / "dashboard.html"
    save_page(path, dashboard.html(read_final(out_dir / "final")), protect)
    log.info("[5/5] dashboard -> %s", path)
    return path


def summary_text(s):
    f = s["final"]
    fr = s["fine_range"]
    return "\n".join([
        f"campaign {s['campaign']} ({s['storage']}), {s['seconds']:.0f} s",
        f"  gradient check: max relative error {s['gradcheck']['max_rel_error']:.1e}",
        f"  coarse best: λ = {s['coarse_best']['lam']:.4g}, val acc {s['coarse_best']['val_acc']:.4f}",
        f"  fine range [{fr['low']:.3g}, {fr['high']:.3g}]; best λ = {s['fine_best']['lam']:.4g}, "
        f"val acc {s['fine_best']['val_acc']:.4f}",
        f"  final λ = {f['lam']:.4g}: test accuracy {f['test_acc_mean']:.4f} ± {f['test_acc_std']:.4f} "
        f"over {len(f['test_acc'])} seeds {f['test_acc']}",
        f"  outputs: {s['outputs']['final']}/ (params, histories, metrics, figures), "
        f"{s['outputs']['dashboard']}"])


def main():
    args = parse_args()
    _common.setup_logging(args)
    start = time.perf_counter()
    out_dir = Path(args.out_dir or f"studies/{args.campaign}")
    protect = _common.protected_paths(args.storage)
    check_results_dir(out_dir / "final", protect)  # both outputs, before any work
    check_page(out_dir / "dashboard.html", protect)
    check_writable(out_dir, flag="--out-dir")
    search_config, final_base = configs(args)
    check_storage(args.storage)
    check_memory(search_config, processes=args.workers)
    check_memory(final_base, processes=args.seeds if args.workers > 1 else 1)
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    final_base = final_n_s(args, final_base, len(data.train.y))
    storage = open_storage(args.storage)
    make_dashboard = dashboard_maker(args, storage)
    with _common.single_blas_thread():
        check = gradient_check(data)
        coarse, fine = search_phases(args, storage, data, search_config)
        metrics = final_phase(args, storage, data, final_base, out_dir / "final", protect,
                              make_dashboard)
    dashboard = write_dashboard(make_dashboard(), out_dir, protect)
    summary = {
        "campaign": args.campaign, "storage": mask_url(args.storage), "gradcheck": check,
        "coarse_best": best_row(coarse), "fine_best": best_row(fine),
        "fine_range": fine.user_attrs.get("fine_range"),
        "final": {"lam": metrics["lam"], "source": metrics["source"],
                  "test_acc": [s["test_acc"] for s in metrics["seeds"]],
                  "test_acc_mean": metrics["test_acc_mean"], "test_acc_std": metrics["test_acc_std"]},
        "outputs": {"final": str(out_dir / "final"), "dashboard": str(dashboard)},
        "seconds": round(time.perf_counter() - start, 1)}
    _common.emit(summary, args, summary_text(summary))
    return 0


if __name__ == "__main__":
    _common.run(main)

"""The main job: gradient check → every search phase of a campaign → final run → dashboard.

    python scripts/pipeline.py [--config dd2424] [--campaign cifar10] [--workers 2] [--json]

The campaign file (default: the shipped dd2424.toml, the report's protocol) names the phases;
flags override it. Everything goes to one storage (default sqlite:///studies/studies.db) and
studies/<campaign>/. Re-running resumes: finished phases are skipped, an interrupted phase
continues where it stopped, and the final run is redone only if its settings changed.
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
from model.dataset import load_cifar10
from model.errors import ConfigError, DivergedError
from model.gradcheck import gradcheck_report
from model.resources import check_memory, check_writable
from model.outputs import check_page, check_results_dir
from search.confirm import run_confirm
from search.campaign import final_config, searched_names, validated, with_config, with_phase
from search.final import check_final_study, read_final, run_final
from search.phases import campaign_best, phase_spec, run_spec
from search.report import best_row, narrowing, space_text
from search.space import format_params
from search.study import campaign_studies, check_storage, mask_url, open_storage

log = logging.getLogger("pipeline")
N_TRAIN = 49_000  # to check the final settings before the data is loaded


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    _common.add_campaign_args(p, "names the studies and studies/<campaign>/ (default: the file's)")
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
    p.add_argument("--out-dir", default=None, help="results folder (default studies/<campaign>)")
    p.add_argument("--force-final", action="store_true",
                   help="replace a recorded final run whose pick differs from the search's")
    _common.add_data_args(p)
    _common.add_common_args(p)
    args = p.parse_args(argv)
    p.require_positive(args, "workers", "coarse_trials", "fine_trials", "repeats", "seeds")
    p.require_workers(args)
    if args.seed is not None:
        p.require_seed(args, "seed")
    if args.repeats is not None:
        p.require_repeats(args)
    return args


def build_campaign(args):
    """The campaign file with the flags applied; ConfigError when they do not fit it."""
    c = _common.campaign(args)
    search = with_config(c.search, n_s=args.search_n_s, cycles=args.search_cycles)
    final = dataclasses.replace(
        c.final, seeds=args.seeds or c.final.seeds,
        n_s=c.final.n_s if args.final_n_s is None else args.final_n_s,
        config=with_config(c.final.config, cycles=args.final_cycles))
    c = dataclasses.replace(c, search=search, final=final,
                            seed=c.seed if args.seed is None else args.seed)
    for phase in c.phases:
        c = with_phase(c, phase.name, **{k: v for k, v in (("repeats", args.repeats),
                                                           ("pruner", args.pruner)) if v})
    for name, n in (("coarse", args.coarse_trials), ("fine", args.fine_trials)):
        if n is not None:
            if name not in [p.name for p in c.phases]:
                raise ConfigError(f"--{name}-trials: campaign {c.name} has no phase {name}")
            c = with_phase(c, name, n_trials=n)
    final_config(c, {}, N_TRAIN)  # the final settings, checked before anything runs
    return validated(c)


def gradient_check(data, n_steps):
    report = gradcheck_report(data.train.X, data.train.y, np.random.default_rng(0))
    worst = max(e for c in report["checks"] for e in c["max_rel_error"].values())
    log.info("[1/%d] gradient check: max relative error %.2e (%s)", n_steps, worst,
             "pass" if report["passed"] else "FAIL")
    if not report["passed"]:
        raise DivergedError(f"gradient check failed (max relative error {worst:.2e} ≥ 1e-5)")
    return {"passed": True, "max_rel_error": worst}


def search_phases(args, c, storage, data):
    """Run every phase of the campaign in order; returns their studies."""
    studies = []
    n = len(c.phases) + 3
    for i, phase in enumerate(c.phases, start=2):
        if phase.kind == "confirm":
            rule = phase.confirm
            log.info("[%d/%d] %s-%s: the best %d configurations of %s on %d paired seeds", i, n,
                     c.name, phase.name, rule["top_k"], ", ".join(rule["from"]), rule["seeds"])
            with _common.trial_bar(phase.n_trials, f"{c.name}-{phase.name}", args) as progress:
                study, verdict = run_confirm(c, phase.name, storage, data, workers=args.workers,
                                             progress=progress)
            log.info("[%d/%d] verdict: %s", i, n, verdict["sentence"])
            studies.append(study)
            continue
        spec = phase_spec(c, phase.name, storage)
        log.info("[%d/%d] %s: %d trials in %s", i, n, spec.study_name, spec.n_trials,
                 space_text(spec.attrs()["space"]))
        with _common.trial_bar(spec.n_trials, spec.study_name, args) as progress:
            studies.append(run_spec(spec, storage, data, workers=args.workers, progress=progress))
    return studies


def final_phase(args, c, storage, data, out, protect, on_cpu_free=None):
    """Train the campaign's best parameters (the final section's values win) on its seeds."""
    best, source = campaign_best(storage, c.name)
    config = final_config(c, best, len(data.train.y))
    params = {k: getattr(config, k) for k in searched_names(c)}
    check_final_study(storage, c.name, params, force=args.force_final)
    seeds = list(range(c.final.seeds))
    step = f"[{len(c.phases) + 2}/{len(c.phases) + 3}] final run"
    done = read_final(out)
    if done and done["metrics"].get("params") == params and done["config"] == {
            **dataclasses.asdict(config), "data": data.source, "seeds": seeds}:
        log.info("%s: already done for %s, skipped", step, format_params(params))
        return done["metrics"]
    log.info("%s: %s from %s, %d seeds × %d updates", step, format_params(params),
             source["study"], len(seeds), config.total_steps)
    with _common.progress_bar(config.total_steps * len(seeds), "final run", args,
                              "update") as progress:
        metrics, _ = run_final(data, config, seeds, params, source, out, storage, c.name,
                               workers=args.workers, on_cpu_free=on_cpu_free, protect=protect,
                               progress=progress)
    return metrics


def dashboard_maker(args, name, storage):
    """A callable returning the campaign's search.plots.Dashboard, made (the studies' sections
    rendered) at its first call. The pipeline calls it first while the final run's last seed
    trains and a CPU is free: the plotting modules (~0.7 s to import, so imported only here) and
    the studies' figures then cost no wall time. A call that failed is made again (and raises) when
    the page is written, after the final run's results are saved."""
    @functools.cache
    def dashboard():
        from search.plots import Dashboard

        return Dashboard(name, mask_url(args.storage), campaign_studies(storage, name))
    return dashboard


def write_dashboard(dashboard, out_dir, protect, step):
    path = out_dir / "dashboard.html"
    save_page(path, dashboard.html(read_final(out_dir / "final")), protect)
    log.info("[%s] dashboard -> %s", step, path)
    return path


def summary_text(s):
    f = s["final"]
    lines = [f"campaign {s['campaign']} ({s['storage']}), {s['seconds']:.0f} s",
             f"  gradient check: max relative error {s['gradcheck']['max_rel_error']:.1e}"]
    for ph in s["phases"]:
        b = ph["best"]
        lines.append(f"  {ph['study']}: {space_text(ph['space'])}; best "
                     + (f"{format_params(b['params'])}, val acc {b['val_acc']:.4f}" if b else "—"))
    if s["verdict"]:
        lines.append(f"  verdict: {s['verdict']['sentence']}")
    lines += [f"  final {format_params(f['params'])}: test accuracy {f['test_acc_mean']:.4f} ± "
              f"{f['test_acc_std']:.4f} over {len(f['test_acc'])} seeds {f['test_acc']}",
              f"  outputs: {s['outputs']['final']}/ (params, histories, metrics, figures), "
              f"{s['outputs']['dashboard']}"]
    return "\n".join(lines)


def main():
    args = parse_args()
    _common.setup_logging(args)
    start = time.perf_counter()
    c = build_campaign(args)
    out_dir = Path(args.out_dir or f"studies/{c.name}")
    protect = _common.protected_paths(args.storage)
    check_results_dir(out_dir / "final", protect)  # both outputs, before any work
    check_page(out_dir / "dashboard.html", protect)
    check_writable(out_dir, flag="--out-dir")
    check_storage(args.storage)
    for phase in c.phases:
        check_memory(c.phase_config(phase), processes=args.workers)
    check_memory(final_config(c, {}, N_TRAIN), processes=c.final.seeds if args.workers > 1 else 1)
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    storage = open_storage(args.storage)
    make_dashboard = dashboard_maker(args, c.name, storage)
    with _common.single_blas_thread():
        check = gradient_check(data, len(c.phases) + 3)
        studies = search_phases(args, c, storage, data)
        metrics = final_phase(args, c, storage, data, out_dir / "final", protect, make_dashboard)
    n = len(c.phases) + 3
    dashboard = write_dashboard(make_dashboard(), out_dir, protect, f"{n}/{n}")
    summary = {
        "campaign": c.name, "storage": mask_url(args.storage), "gradcheck": check,
        "phases": [{"study": st.study_name, "space": st.user_attrs.get("space"),
                    "narrowed": narrowing(st), "best": best_row(st)} for st in studies],
        "verdict": next((st.user_attrs["verdict"] for st in studies
                         if isinstance(st.user_attrs.get("verdict"), dict)), None),
        "final": {"params": metrics["params"], "source": metrics["source"],
                  "test_acc": [s["test_acc"] for s in metrics["seeds"]],
                  "test_acc_mean": metrics["test_acc_mean"], "test_acc_std": metrics["test_acc_std"]},
        "outputs": {"final": str(out_dir / "final"), "dashboard": str(dashboard)},
        "seconds": round(time.perf_counter() - start, 1)}
    _common.emit(summary, args, summary_text(summary))
    return 0


if __name__ == "__main__":
    _common.run(main)

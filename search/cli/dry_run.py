"""--dry-run: the resolved campaign and an estimate of what it trains, printed before anything is
read or written (no storage, no data, no studies/ folder)."""
import dataclasses

from clr_lambda_search.model.resources import check_memory
from clr_lambda_search.model.train import TrainConfig
from clr_lambda_search.search import plan
from clr_lambda_search.search.cli.output import emit
from clr_lambda_search.search.cli.threads import cpu_count, single_blas_thread
from clr_lambda_search.search.report import space_text
from clr_lambda_search.search.space import format_params
from clr_lambda_search.search.study import mask_url

CIFAR10_IMAGES = 50_000  # the training batches; --n-val of them validate (the data is not read)


def dry_run(args, c, parts, pick=None, gradcheck=False):
    """Print (or --json) the plan of these parts of campaign c; returns the exit status 0."""
    n_train = CIFAR10_IMAGES - args.n_val
    for phase in c.phases:  # what the run would refuse, refused here too
        if phase.name in parts:
            check_memory(c.phase_config(phase), processes=args.workers)
    with single_blas_thread():
        estimate = plan.plan(c, parts, n_train, args.n_val, pick=pick,
                             workers=getattr(args, "workers", 1), cpus=cpu_count())
    summary = {"dry_run": True, "campaign": c.name, "source": c.source,
               "storage": mask_url(args.storage), "seed": c.seed, "parts": list(parts),
               "gradcheck": gradcheck, "n_train": n_train, "n_val": args.n_val, **estimate}
    emit(summary, args, text(summary))
    return 0


def text(s):
    lines = [f"dry run of campaign {s['campaign']} ({s['source']}; storage {s['storage']}, "
             f"sampler seed {s['seed']}): no data or storage read, nothing written"]
    if s["gradcheck"]:
        lines.append("  gradient check (seconds)")
    for r in s["phases"]:
        lines.append(f"  {r['name']} ({r['kind']}, study {r['study']}): " + _spec(r))
        lines.append(f"    {_config_text(r['config'])}")
        lines.append("    " + _cost_text(r))
    f = s["final"]
    if f:
        pick = format_params(f["pick"]) if f["pick"] else "the campaign's best, read at run time"
        lines.append(f"  final (study {f['study']}): {f['seeds']} seeds of {pick}; n_s "
                     f"{f['n_s']}")
        lines.append(f"    {_config_text(f['config'])}")
        lines.append("    " + _cost_text(f))
    lines.append(f"  total ≈ {s['updates']:,} updates ≈ {_duration(s['seconds'])} on one "
                 f"worker, ≈ {_duration(s['wall_seconds'])} with {s['workers']} worker(s) on "
                 f"{s['cpus']} CPU(s); pruned trials stop early, failed and pruned ones add "
                 "trials: not counted")
    return "\n".join(lines)


def _spec(r):
    if "top_k" in r:  # a confirm phase
        return (f"the best {r['top_k']} configurations of {', '.join(r['from'])} × {r['seeds']} "
                "paired seeds")
    space = (f"narrowed from {r['narrow']['from']} at run time (best {r['narrow']['top_k']}, "
             f"margin {r['narrow']['margin']}) inside {space_text(r['base_space'])}"
             if r.get("narrow") else space_text(r["space"]))
    trials = (f"a budget of {r['budget']} (at most {r['n_trials']} trials)" if r.get("budget")
              else f"{r['n_trials']} trials")
    start = f"; first {format_params(r['start'][0])} …" if r.get("start") else ""
    return (f"{space}; sampler {r['sampler']}, pruner {r['pruner']}; {trials}"
            + (f" × {r['repeats']} seeds" if r["repeats"] > 1 else "") + start)


def _config_text(config):
    """n_s, cycles and the fields that differ from TrainConfig's defaults (None: searched, known
    at run time)."""
    default = dataclasses.asdict(TrainConfig())
    changed = {k: ("searched" if v is None else v) for k, v in config.items()
               if v != default[k] or k in ("n_s", "cycles")}
    return "config: " + (" ".join(f"{k}={v}" for k, v in changed.items()) or "TrainConfig's "
                         "defaults")


def _cost_text(r):
    w = r["estimated_with"]
    full = r.get("updates_without_budget", r["updates"])
    cut = f", cut to {r['updates']:,} by the budget" if full != r["updates"] else ""
    return (f"{r['trainings']} trainings × {r['updates_per_training']:,} updates = "
            f"{full:,} updates{cut}, {r['evaluated_images']:,} images evaluated; step "
            f"{r['step_ms']:.2f} ms measured here at m={w['m']}, batch {w['n_batch']} ≈ "
            f"{_duration(r['seconds'])}")


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

"""Train the network once and evaluate it on the test set.

    python scripts/train.py --lam 0.01 --cycles 3 --n-s 980 [--data-dir DIR] [--out DIR] [--json]

Writes params.npz, config.json, history.json, metrics.json and the figures (cost, loss, accuracy,
lr .png) into --out (default studies/runs/<name>: λ, every setting that is not the default, and
the seed, e.g. lam0.01-m512-dropout0.3-seed0). A folder holding a run of other settings is never
replaced.
"""
import dataclasses
import json
import time
from pathlib import Path

from clr_lambda_search.model.checkpoint import save_run
from clr_lambda_search.model.dataset import load_cifar10
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.outputs import check_results_dir, publish_dir
from clr_lambda_search.model.resources import check_memory, check_writable
from clr_lambda_search.model.train import TrainConfig, evaluate, evaluate_ensemble, fit
from clr_lambda_search.search.cli.args import (WORKERS_PER_CPU, Parser, add_common_args, add_data_args,
                             add_set_arg, add_train_args)
from clr_lambda_search.search.cli.configs import train_config
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, progress_bar, setup_logging
from clr_lambda_search.search.cli.storage import protected_paths, storage_url
from clr_lambda_search.search.cli.threads import blas_threads, cpu_count
from clr_lambda_search.search.space import format_params


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_train_args(p)
    add_set_arg(p, "config.lam=0.001 (TrainConfig fields, as in a campaign's [config])")
    add_data_args(p)
    p.add_argument("--out", default=None,
                   help="results folder (default studies/runs/<λ, every non-default setting, "
                        "seed>, e.g. lam0.01-m512-seed0)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads of this run (default 1; 2 uses both cores for one wide run, "
                        "see docs/threads.md)")
    add_common_args(p)
    args = p.parse_args(argv)
    p.require_positive(args, "threads")
    if args.threads > WORKERS_PER_CPU * cpu_count():
        p.error(f"--threads {args.threads} is more than {WORKERS_PER_CPU} per CPU (this machine "
                f"has {cpu_count()})")
    return args


N_VAL = 1000  # search.cli.args' default --n-val


def settings(config, n_val=N_VAL):
    """{name: value}: λ, then every TrainConfig field that is not its default (and --n-val):
    what the run's folder name and figure titles name (the seed comes last, apart)."""
    default = TrainConfig()
    named = {"lam": config.lam}
    named.update({f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
                  if f.name not in ("lam", "seed")
                  and getattr(config, f.name) != getattr(default, f.name)})
    return {**named, **({"n_val": n_val} if n_val != N_VAL else {})}


def run_name(config, n_val=N_VAL):
    """The default folder name of a run: its settings(), then the seed; two runs of other
    settings never share a folder."""
    parts = [name if value is True else f"no-{name}" if value is False
             else f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}"
             for name, value in settings(config, n_val).items()]
    return "-".join(parts + [f"seed{config.seed}"])


def check_same_run(out, config):
    """InputError when the folder `out` holds a run of another TrainConfig: a run replaces only
    a folder of the same settings (a re-run), never another run's."""
    try:
        have = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return  # no run there (check_results_dir refuses a folder that is not ours)
    want = dataclasses.asdict(config)
    diff = [k for k in want if k in have and have[k] != want[k]]
    if diff:
        shown = ", ".join(f"{k} {have[k]} (now {want[k]})" for k in diff[:3])
        raise InputError(f"{out} holds a run of other settings ({shown}); pass another --out "
                         "or remove that folder")


def main():
    args = parse_args()
    setup_logging(args)
    config = train_config(args)
    out = args.out or f"studies/runs/{run_name(config, args.n_val)}"
    protect = protected_paths(storage_url())
    check_results_dir(out, protect)
    check_same_run(out, config)
    check_writable(out)
    check_memory(config)
    data = load_cifar10(args.data_dir, n_val=args.n_val, dtype=config.dtype)
    start = time.perf_counter()
    with blas_threads(args.threads), \
            progress_bar(config.total_steps, "training", args, "update") as progress:
        params, history, snapshots = fit(
            data, config, on_eval=(lambda r: progress(r["step"])) if progress else None,
            snapshots=True)
        test = evaluate(params, data.test.X, data.test.y, config.lam)
        ensemble = evaluate_ensemble(snapshots, data.test.X, data.test.y)  # one per cycle end
    seconds = time.perf_counter() - start
    last = history[-1]
    metrics = {"lam": config.lam, "train_acc": last["train"]["acc"], "val_acc": last["val"]["acc"],
               "test_acc": test["acc"], "test_loss": test["loss"], "test_cost": test["cost"],
               "test_acc_ensemble": ensemble["acc"], "steps": config.total_steps,
               "seconds": round(seconds, 2), "threads": args.threads}
    publish_dir(out, lambda folder: save_run(folder, config, metrics, [("", params, history)],
                                             {"data": data.source},
                                             named=format_params(settings(config, args.n_val))),
                protect)
    summary = {**metrics, "out": str(out)}
    emit(summary, args,
                 f"λ={config.lam:g}: train acc {metrics['train_acc']:.4f}, val acc "
                 f"{metrics['val_acc']:.4f}, test acc {metrics['test_acc']:.4f} (snapshot "
                 f"ensemble of {len(snapshots)}: {ensemble['acc']:.4f}) after "
                 f"{config.total_steps} updates in {seconds:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    run(main)

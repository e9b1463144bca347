"""Analytic vs numerical gradients of the network, at λ = 0 and at a λ that matters.

    python scripts/gradcheck.py [--data-dir DIR] [--lam 0.1] [--json]

Runs in float64 on a slice of the normalised CIFAR-10 training split (first --dims dimensions of
--samples images, a hidden layer of --m units); passes when every key's max relative error is
below --tol (exit 0, else 1).
"""
import numpy as np

from clr_lambda_search.model.dataset import load_cifar10
from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.gradcheck import gradcheck_report
from clr_lambda_search.model.network import PARAM_KEYS
from clr_lambda_search.search import settings
from clr_lambda_search.search.cli.args import Parser, add_common_args, add_data_args, add_set_arg
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, setup_logging

# Centred differences cost two forward passes per parameter: with 3072 dims, m = 1000 would be 3M
# parameters × 2 passes (hours), and m = 10⁹ would not fit in memory. A check needs a small net.
MAX_M = 1000
# --set: the TrainConfig fields a check uses, as in a campaign's [config] (the flags' shortcuts)
SET_KEYS = {"config.lam": "lam", "config.m": "m", "config.dropout": "dropout",
            "config.seed": "seed"}
# Above this λ the L2 term swamps the loss: the centred differences of the cost lose the biases'
# (unregularised) gradients to rounding and the check fails whatever the code (1e6 fails here).
MAX_LAM = 1e3


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_data_args(p)
    p.add_argument("--lam", type=float, default=0.1, help="the λ > 0 checked besides 0")
    p.add_argument("--dims", type=int, default=20, help="input dimensions of the slice")
    p.add_argument("--samples", type=int, default=5, help="images in the slice")
    p.add_argument("--m", type=int, default=10, help="hidden units")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="check through inverted dropout with one fixed mask of this rate, in [0, 1)")
    p.add_argument("--tol", type=float, default=1e-5, help="pass below this relative error")
    p.add_argument("--seed", type=int, default=0, help="seed of the params")
    add_set_arg(p, f"config.m=20 (keys: {', '.join(SET_KEYS)})")
    add_common_args(p)
    args = p.parse_args(argv)
    apply_set(args)
    p.require_finite(args, "lam", "tol")
    if not 0 < args.lam <= MAX_LAM:
        p.error(f"--lam must lie in (0, {MAX_LAM:g}] (got {args.lam}); λ = 0 is always checked "
                "too")
    if not args.tol > 0:
        p.error(f"--tol must be > 0 (got {args.tol})")
    if not (0 < args.dims <= 3072 and 0 < args.samples <= 1000 and 0 < args.m <= MAX_M):
        p.error(f"--dims must be in 1..3072, --samples in 1..1000 and --m in 1..{MAX_M}")
    p.require_seed(args, "seed")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must lie in [0, 1) (got {args.dropout})")
    return args


def apply_set(args):
    """--set's values onto the flags they are the keys of (checked below, as the flags are)."""
    for key, value in settings.parse_pairs(args.set).items():
        if key not in SET_KEYS:
            raise ConfigError(settings.unknown_key(key, list(SET_KEYS), "a gradient check takes "
                                                   + ", ".join(SET_KEYS)))
        settings.check_kind(key, value)
        setattr(args, SET_KEYS[key], value)


def table(report, args):
    rows = [f"{'λ':>8} " + " ".join(f"{k:>10}" for k in PARAM_KEYS)]
    rows += [f"{c['lam']:>8g} " + " ".join(f"{c['max_rel_error'][k]:10.2e}" for k in PARAM_KEYS)
             for c in report["checks"]]
    verdict = "PASS" if report["passed"] else "FAIL"
    rows.append(f"{verdict}: max relative error {'<' if report['passed'] else '≥'} {args.tol:g} "
                f"(float64, {args.samples} images × {args.dims} dims, m={args.m}"
                f"{f', dropout {args.dropout:g}' if args.dropout else ''})")
    return "\n".join(rows)


def main():
    args = parse_args()
    setup_logging(args)
    data = load_cifar10(args.data_dir, n_val=args.n_val)
    report = gradcheck_report(data.train.X, data.train.y, np.random.default_rng(args.seed),
                              lams=(0.0, args.lam), dims=args.dims, samples=args.samples, m=args.m,
                              tol=args.tol, dropout=args.dropout)
    emit(report, args, table(report, args))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    run(main)

"""Analytic vs numerical gradients of the network, at λ = 0 and at a λ that matters.

    python scripts/gradcheck.py [--data-dir DIR] [--lam 0.1] [--json]

Runs in float64 on a slice of real CIFAR-10 (first --dims dimensions of --samples images, a hidden
layer of --m units); passes when every key's max relative error is below --tol.
"""
import numpy as np

import _common
from model.data import load_batch, resolve_batches_dir, train_stats
from model.gradcheck import check_gradients, gradcheck_slice
from model.network import PARAM_KEYS


def parse_args(argv=None):
    p = _common.Parser(description=__doc__.splitlines()[0])
    _common.add_data_args(p)
    p.add_argument("--lam", type=float, default=0.1, help="the λ > 0 checked besides 0")
    p.add_argument("--dims", type=int, default=20, help="input dimensions of the slice")
    p.add_argument("--samples", type=int, default=5, help="images in the slice")
    p.add_argument("--m", type=int, default=10, help="hidden units")
    p.add_argument("--tol", type=float, default=1e-5, help="pass below this relative error")
    p.add_argument("--seed", type=int, default=0, help="seed of the params")
    _common.add_common_args(p)
    args = p.parse_args(argv)
    if args.lam <= 0:
        p.error(f"--lam must be > 0 (got {args.lam}); λ = 0 is always checked too")
    if not (0 < args.dims <= 3072 and 0 < args.samples <= 10000 and args.m > 0):
        p.error("--dims must be in 1..3072, --samples in 1..10000 and --m positive")
    return args


def real_slice(args, rng):
    """The float64 slice of data_batch_1, normalised with that batch's own statistics."""
    X, y = load_batch(resolve_batches_dir(args.data_dir) / "data_batch_1")
    mean, std = train_stats(X)
    X = (X[:args.samples] / 255.0 - mean) / std
    return gradcheck_slice(X, y, rng, dims=args.dims, samples=args.samples, m=args.m)


def main():
    args = parse_args()
    _common.setup_logging(args)
    rng = np.random.default_rng(args.seed)
    X, y, params = real_slice(args, rng)
    checks = [{"lam": lam, "max_rel_error": check_gradients(X, y, params, lam)}
              for lam in (0.0, args.lam)]
    passed = all(e < args.tol for c in checks for e in c["max_rel_error"].values())
    rows = [f"{'λ':>8} " + " ".join(f"{k:>10}" for k in PARAM_KEYS)]
    rows += [f"{c['lam']:>8g} " + " ".join(f"{c['max_rel_error'][k]:10.2e}" for k in PARAM_KEYS)
             for c in checks]
    rows.append(f"{'PASS' if passed else 'FAIL'}: max relative error "
                f"{'<' if passed else '≥'} {args.tol:g} (float64, {args.samples} images × "
                f"{args.dims} dims, m={args.m})")
    _common.emit({"checks": checks, "passed": passed}, args, "\n".join(rows))
    return 0 if passed else 1


if __name__ == "__main__":
    _common.run(main)

"""Analytic vs numerical gradients: centred differences in float64 on a small slice of data.

The slice takes the input dimensions that vary most across its images, not the first ones: on
data whose leading dimensions are constant (images with a uniform border) those are all 0 after
normalisation, every hidden unit then sits on the ReLU's kink (its input is the bias, 0), and
the centred difference measures the kink instead of the gradient.
"""
import numpy as np

from clr_lambda_search.model.layers import dropout_mask
from clr_lambda_search.model.network import PARAM_KEYS, init_params, loss_and_grads


def numerical_grads(f, params, h=1e-5):
    """Centred differences (f(p + h) − f(p − h)) / 2h of the scalar f(params) for every entry."""
    grads = {}
    for key in PARAM_KEYS:
        p = params[key]
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            f_plus = f(params)
            p[i] = old - h
            f_minus = f(params)
            p[i] = old
            g[i] = (f_plus - f_minus) / (2 * h)
        grads[key] = g
    return grads


NEGLIGIBLE = 1e-9  # |a| + |n| below this: both gradients are zero to the differences' accuracy


def relative_error(a, n, eps=1e-12, negligible=NEGLIGIBLE):
    """Max over entries of |a − n| / max(eps, |a| + |n|), where an entry whose gradients are both
    negligible (|a| + |n| < negligible, below the centred differences' own error, ~h²) counts
    as 0: there the ratio would divide one round-off by another."""
    total = np.abs(a) + np.abs(n)
    with np.errstate(invalid="ignore"):  # a non-finite gradient gives nan: a failed check
        err = np.where(total < negligible, 0.0, np.abs(a - n) / np.maximum(eps, total))
    return float(np.max(err))


def check_gradients(X, y, params, lam, h=1e-5, mask=None):
    """Max relative error per key between loss_and_grads and centred differences of the cost.

    mask: None, or a fixed inverted-dropout mask (N, m) on the hidden layer (layers.dropout_mask),
    the same for both sides: with the mask fixed the cost is a smooth function of the params.

    The analytic gradients are computed in the params' dtype (float64). The differences are taken
    in extended precision (np.longdouble: 80-bit on x86) so that their rounding error,
    ~eps·|cost|/h, stays far below the gradients' smallest entries: in float64 it is ~1e-10 and
    gives relative errors up to ~3e-7 on tiny entries whatever the quality of the gradients.
    """
    _, _, analytic = loss_and_grads(params, X, y, lam, mask)
    X_ext = X.astype(np.longdouble)
    params_ext = {k: v.astype(np.longdouble) for k, v in params.items()}
    mask_ext = None if mask is None else mask.astype(np.longdouble)
    numeric = numerical_grads(lambda p: loss_and_grads(p, X_ext, y, lam, mask_ext)[0],
                              params_ext, h)
    return {k: relative_error(analytic[k], numeric[k]) for k in PARAM_KEYS}


def gradcheck_slice(X, y, rng, dims=20, samples=5, m=10, K=10):
    """A float64 slice (the `dims` dimensions that vary most over the first `samples` rows, see
    informative_dims) and fresh params of hidden size m."""
    rows = np.asarray(X[:samples], dtype=np.float64)
    X_small = np.ascontiguousarray(rows[:, informative_dims(rows, dims)])
    return X_small, y[:samples], init_params(dims, m, K, rng, dtype=np.float64)


def informative_dims(rows, dims):
    """The indices (ascending) of the `dims` columns of rows with the largest variance; ties go to
    the lower index, so data whose columns all vary alike give the first ones."""
    order = np.argsort(-rows.var(axis=0), kind="stable")
    return np.sort(order[:dims])


def gradcheck_report(X, y, rng, lams=(0.0, 0.1), dims=20, samples=5, m=10, tol=1e-5,
                     dropout=0.0):
    """{"checks": [{"lam", "max_rel_error": {key: err}}], "passed"} on a float64 slice of X, y.
    dropout > 0: through inverted dropout with one fixed mask drawn from rng (after the params)."""
    X_small, y_small, params = gradcheck_slice(X, y, rng, dims=dims, samples=samples, m=m)
    mask = dropout_mask(rng.random((samples, m)), dropout) if dropout else None
    checks = [{"lam": lam, "max_rel_error": check_gradients(X_small, y_small, params, lam,
                                                            mask=mask)}
              for lam in lams]
    passed = all(e < tol for c in checks for e in c["max_rel_error"].values())
    return {"checks": checks, "passed": passed}

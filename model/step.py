"""The fused mini-batch GD step used by training: in place, into preallocated buffers.

It computes what network.loss_and_grads computes (tests hold the two together) but does no
allocation the size of X_b or W1 in the hot loop: the batch is gathered into a reused buffer, the
softmax gradient is pre-scaled by η/B so the backward GEMM writes η·∇W1 directly, and the L2 term
is folded into the update as a decay W ← (1 − 2ηλ)W − η∇loss.

Where the time goes (scripts/bench.py measures it): the two GEMMs with X_b (forward X_b W1,
backward X_bᵀ dH) are the floor; gathering 100 random 12 kB rows from a 600 MB array is the next
cost (memory bound); then ~25 NumPy calls on small arrays, a few µs each whatever their size; then
the two passes of the W1 update. Measured and dropped: scores transposed to (K, B) with fewer
calls (2 µs of a ~1,100 µs step), and the decay folded into the backward GEMM (scipy sgemm with
β = 1 − 2ηλ: no faster, OpenBLAS applies β in a pass of its own).
"""
import numpy as np

from model.errors import DivergedError


def make_workspace(n_batch, D, m, K, dtype):
    """Buffers for one step of at most n_batch samples."""
    return {
        "X": np.empty((n_batch, D), dtype=dtype),   # gathered batch
        "H": np.empty((n_batch, m), dtype=dtype),   # hidden activations
        "S": np.empty((n_batch, K), dtype=dtype),   # scores, then η/B·(P − Y)
        "dH": np.empty((n_batch, m), dtype=dtype),
        "dW1": np.empty((D, m), dtype=dtype),
        "rows": np.arange(n_batch),
    }


def sgd_step(params, X, y, idx, eta, lam, ws):
    """One update of params (in place) on the samples X[idx], y[idx] with step size eta.

    idx must hold valid row numbers 0 <= i < len(X) (train() passes slices of a permutation).
    Raises DivergedError when the scores stop being finite.
    """
    B = len(idx)
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    Xb, H, S, dH = ws["X"][:B], ws["H"][:B], ws["S"][:B], ws["dH"][:B]
    # mode="clip" because with the default mode="raise" NumPy gathers into a temporary and copies
    # it into `out`, which doubles the cost; idx is in range, so nothing is clipped.
    np.take(X, idx, axis=0, out=Xb, mode="clip")
    # forward: H = relu(Xb W1 + b1), S = H W2 + b2
    np.matmul(Xb, W1, out=H)
    H += b1
    np.maximum(H, 0, out=H)
    np.matmul(H, W2, out=S)
    S += b2
    _softmax_grad_inplace(S, y[idx], ws["rows"][:B], eta / B)
    # backward through W2 (before W2 changes) and the ReLU
    np.matmul(S, W2.T, out=dH)
    dH *= H > 0
    decay = 1.0 - 2.0 * eta * lam
    b2 -= S.sum(axis=0)
    b1 -= dH.sum(axis=0)
    W2 *= decay
    W2 -= H.T @ S
    np.matmul(Xb.T, dH, out=ws["dW1"])  # η·∂loss/∂W1
    if lam:
        W1 *= decay
    W1 -= ws["dW1"]


def _softmax_grad_inplace(S, y, rows, scale):
    """Turn scores S (B, K) into scale·(softmax(S) − onehot(y)) in place."""
    row_max = S.max(axis=1, keepdims=True)
    if not np.isfinite(row_max).all():
        raise DivergedError("non-finite scores")
    S -= row_max
    np.exp(S, out=S)
    S *= scale / S.sum(axis=1, keepdims=True)
    S[rows, y] -= scale

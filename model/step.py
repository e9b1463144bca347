"""The fused mini-batch GD step used by training: in place, into preallocated buffers.

It computes what network.loss_and_grads computes (tests hold the two together) but does no
allocation the size of X_b or W1 in the hot loop: the batch is gathered into a reused buffer, the
softmax gradient is pre-scaled by η/B so the backward GEMMs write η·∇ directly, and the L2 term is
folded into the update as a decay W ← (1 − 2ηλ)W − η∇loss.

Where the time goes (scripts/bench.py measures it): the two GEMMs with X_b (forward X_b W1,
backward X_bᵀ dH) are the floor; gathering 100 random 12 kB rows from a 600 MB array is the next
cost (memory bound); everything else is small arrays, where each NumPy call costs more than its
arithmetic, so the step keeps the number of calls low.
"""
import numpy as np

from model.errors import DivergedError


def make_workspace(n_batch, D, m, K, dtype):
    """Buffers for one step of at most n_batch samples."""
    return {
        "X": np.empty((n_batch, D), dtype=dtype),    # gathered batch
        "H": np.empty((n_batch, m), dtype=dtype),    # hidden activations
        "S": np.empty(K * n_batch, dtype=dtype),     # scores, transposed (K, B); see _scores_t
        "z": np.empty(n_batch, dtype=dtype),         # per-sample max, then normaliser
        "dH": np.empty((n_batch, m), dtype=dtype),
        "mask": np.empty((n_batch, m), dtype=bool),  # ReLU gate
        "dW1": np.empty((D, m), dtype=dtype),
        "dW2": np.empty((m, K), dtype=dtype),
        "rows": np.arange(n_batch),
    }


def sgd_step(params, X, y, idx, eta, lam, ws):
    """One update of params (in place) on the samples X[idx], y[idx] with step size eta.

    idx must hold valid row numbers 0 <= i < len(X) (train() passes slices of a permutation).
    Raises DivergedError when the scores stop being finite.
    """
    B = len(idx)
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    Xb, H, dH, mask = ws["X"][:B], ws["H"][:B], ws["dH"][:B], ws["mask"][:B]
    # mode="clip" because with the default mode="raise" NumPy gathers into a temporary and copies
    # it into `out` (a second pass over the 1.2 MB batch); idx is in range, so nothing is clipped.
    np.take(X, idx, axis=0, out=Xb, mode="clip")
    # forward: H = relu(Xb W1 + b1)
    np.matmul(Xb, W1, out=H)
    H += b1
    np.maximum(H, 0, out=H)
    ST = _scores_t(H, W2, b2, ws, B)
    _softmax_grad_t(ST, y[idx], ws, eta / B)  # ST = η/B·(P − Y)ᵀ, (K, B)
    # backward through W2 (before W2 changes) and the ReLU
    np.matmul(ST.T, W2.T, out=dH)
    np.greater(H, 0, out=mask)
    dH *= mask
    decay = 1.0 - 2.0 * eta * lam
    b2 -= ST.sum(axis=1)
    b1 -= dH.sum(axis=0)
    dW2 = np.matmul(H.T, ST.T, out=ws["dW2"])
    W2 *= decay
    W2 -= dW2
    dW1 = np.matmul(Xb.T, dH, out=ws["dW1"])  # η·∂loss/∂W1
    if lam:
        W1 *= decay
    W1 -= dW1


def _scores_t(H, W2, b2, ws, B):
    """Scores Sᵀ = (H W2 + b2)ᵀ, (K, B), in the workspace.

    Transposed because K = 10 is too short an inner loop: the softmax runs along rows of B.
    The buffer is taken as a contiguous prefix so that a smaller last batch is contiguous too.
    """
    K = b2.shape[0]
    ST = ws["S"][:K * B].reshape(K, B)
    np.matmul(W2.T, H.T, out=ST)
    ST += b2[:, None]
    return ST


def _softmax_grad_t(ST, y, ws, scale):
    """Turn transposed scores ST (K, B) into scale·(softmax − onehot(y))ᵀ in place."""
    K, B = ST.shape
    z = ws["z"][:B]
    np.max(ST, axis=0, out=z)
    ST -= z
    np.exp(ST, out=ST)
    np.sum(ST, axis=0, out=z)
    # a column whose max is inf or NaN is NaN by now (inf − inf): checking the sums is checking
    # that every sample's top score is finite
    if not np.isfinite(z).all():
        raise DivergedError("non-finite scores")
    np.divide(scale, z, out=z)
    ST *= z
    ST.reshape(-1)[y * B + ws["rows"][:B]] -= scale  # flat index of (y_i, i)

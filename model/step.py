"""The fused mini-batch GD step used by training: in place, into preallocated buffers.

It computes what network.loss_and_grads computes (tests hold the two together) in four calls: the
batch gather, the forward GEMM X_b W1, one compiled kernel (numba) for everything on the small
(B, m) and (B, K) arrays, and the backward GEMM X_bᵀ dH followed by a one-pass W1 update. The
softmax gradient is pre-scaled by η/B, so the backward GEMM yields η·∇W1 directly, and the L2 term
is folded into the update as a decay W ← (1 − 2ηλ)W − η∇loss.

Where the time goes (scripts/bench.py measures it): the two GEMMs with X_b are the floor; the
gather is the next cost: 100 random rows of the uint8 training pixels (3 kB each, from DRAM),
normalised on the fly into 1.2 MB of X_b (reading X's float32 rows instead moves 4× the bytes),
each row's loads requested while the row before it is converted.
The rest was ~25 NumPy calls on small arrays, a few µs each whatever their size, until they became
the one kernel below (its three small products still go to BLAS: numba's np.dot calls the
sgemm/dgemm of scipy's BLAS, 3× faster than loops over K = 10). Measured and dropped: the decay
folded into the backward GEMM (BLAS β: OpenBLAS applies β in a pass of its own; through SciPy's
gemm, which takes α and β, one call was as slow as NumPy's GEMM plus the update); fastmath in the
kernel (with it, the finiteness check stopped catching inf scores); prefetching the whole next
batch at once (the prefetch instructions stall as long as the loads they save).

Float order: the kernel sums in another order than the NumPy calls it replaced, so a run's
figures moved at the float32 round-off level; a seed still gives bit-identical runs
(tests/test_train.py), and the step equals the reference to round-off (tests/test_step.py).
"""
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot calls it; loaded now so threadpoolctl
from llvmlite import ir          # pins its BLAS threads too
from numba import njit, types
from numba.extending import intrinsic

from model.errors import DivergedError


def make_workspace(n_batch, D, m, K, dtype):
    """Buffers for one step of at most n_batch samples."""
    return {
        "X": np.empty((n_batch, D), dtype=dtype),   # gathered batch
        "H": np.empty((n_batch, m), dtype=dtype),   # hidden activations
        "S": np.empty((n_batch, K), dtype=dtype),   # scores, then η/B·(P − Y)
        "dH": np.empty((n_batch, m), dtype=dtype),
        "dW2": np.empty((m, K), dtype=dtype),
        "dW1": np.empty((D, m), dtype=dtype),
    }


def sgd_step(params, X, y, idx, eta, lam, ws, pixels=None):
    """One update of params (in place) on the samples X[idx], y[idx] with step size eta.

    idx must hold valid row numbers 0 <= i < len(X) (train() passes slices of a permutation).
    pixels: X's model.data.Pixels or None (see gather_batch).
    Raises DivergedError when the scores stop being finite (params are then left unchanged).
    """
    B = len(idx)
    W1 = params["W1"]
    Xb, H, S, dH = ws["X"][:B], ws["H"][:B], ws["S"][:B], ws["dH"][:B]
    gather_batch(X, idx, Xb, pixels)
    np.matmul(Xb, W1, out=H)
    decay = 1.0 - 2.0 * eta * lam
    if not _small_layers_step(H, params["b1"], params["W2"], params["b2"], y[idx], eta / B, decay,
                              S, dH, ws["dW2"]):
        raise DivergedError("non-finite scores")
    np.matmul(Xb.T, dH, out=ws["dW1"])  # η·∂loss/∂W1
    _decay_and_subtract(W1, ws["dW1"], decay)


def gather_batch(X, idx, out, pixels=None):
    """out ← X[idx]. From X's pixels (model.data.Pixels) when given and they normalise into out's
    dtype: the same rows, bit for bit, from a quarter of the bytes; else from X itself."""
    if pixels is not None and pixels.scale.dtype == out.dtype:
        _gather_normalised(pixels.raw, idx, pixels.scale, pixels.shift, out)
    elif X.dtype == out.dtype:
        # mode="clip" because with the default mode="raise" NumPy gathers into a temporary and
        # copies it into `out`, which doubles the cost; idx is in range, so nothing is clipped.
        np.take(X, idx, axis=0, out=out, mode="clip")
    else:
        out[...] = X[idx]  # data in another dtype than the params: cast (np.take warns doing so)


@njit(cache=True)
def _small_layers_step(H, b1, W2, b2, y, scale, decay, S, dH, dW2):
    """Given H = X_b W1 (B, m): finish the forward pass, backpropagate to dH = scale·∂loss/∂(X_b W1)
    and update b1, W2, b2 in place. Returns False, changing no parameter, if a score is not finite.

    scale = η/B turns the gradients into update steps; decay = 1 − 2ηλ applies the L2 term.
    """
    B, m = H.shape
    K = S.shape[1]
    for i in range(B):                      # H ← relu(H + b1), NaN kept (max() would drop it)
        h = H[i]
        for j in range(m):
            v = h[j] + b1[j]
            h[j] = 0.0 if v < 0.0 else v
    np.dot(H, W2, S)
    finite = True
    for i in range(B):                      # S ← scale·(softmax(H W2 + b2) − onehot(y))
        s = S[i]
        for k in range(K):
            s[k] += b2[k]
        top = s[0]
        for k in range(1, K):
            top = max(top, s[k])
        total = 0.0
        for k in range(K):
            s[k] = np.exp(s[k] - top)
            total += s[k]
        finite &= np.isfinite(total)        # NaN or inf anywhere in the row reaches the total
        factor = scale / total
        for k in range(K):
            s[k] *= factor
        s[y[i]] -= scale
    if not finite:
        return False
    np.dot(S, W2.T, dH)                     # through W2 (before it changes) and the ReLU
    for i in range(B):
        for j in range(m):
            dH[i, j] = dH[i, j] if H[i, j] > 0.0 else 0.0
    for k in range(K):
        b2[k] -= S[:, k].sum()
    for j in range(m):
        b1[j] -= dH[:, j].sum()
    np.dot(H.T, S, dW2)
    for j in range(m):
        for k in range(K):
            W2[j, k] = W2[j, k] * decay - dW2[j, k]
    return True


@njit(cache=True)
def _gather_normalised(raw, idx, scale, shift, out):
    """out[i] = raw[idx[i]]·scale + shift, rounded as model.data.normalise rounds it.

    The rows are random, so the hardware prefetcher cannot guess where the next one starts and
    each row would begin with a wait on DRAM: while converting row i, one cache line of row i+1
    is requested per line converted (one batch ahead stalled instead: 100 rows of requests at once).
    """
    flat = raw.reshape(raw.size)
    D = raw.shape[1]
    whole_lines = D - D % _CACHE_LINE
    for i in range(idx.shape[0]):
        row, o = raw[idx[i]], out[i]
        ahead = idx[i + 1] * D if i + 1 < idx.shape[0] else -1
        for start in range(0, whole_lines, _CACHE_LINE):
            if ahead >= 0:
                _prefetch(flat, ahead + start)
            # a constant trip count over slices: LLVM vectorises it without runtime alias checks
            stop = start + _CACHE_LINE
            r, sc, sh, o_ = row[start:stop], scale[start:stop], shift[start:stop], o[start:stop]
            for d in range(_CACHE_LINE):
                o_[d] = _normalised(r[d], sc[d], sh[d])
        for d in range(whole_lines, D):
            o[d] = _normalised(row[d], scale[d], shift[d])


@njit(inline="always")
def _normalised(pixel, scale, shift):
    # uint8 · float promotes to scale's dtype, as in NumPy; numba fuses no multiply-add
    return pixel * scale + shift


_CACHE_LINE = 64  # bytes, i.e. uint8 pixels


@intrinsic
def _prefetch(typingctx, flat, offset):
    """Ask the CPU to start loading the cache line of flat[offset] (a hint: never faults)."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        address = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [address.type],
            ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        # read (0), locality 2 (keep in L2 and below), data cache (1)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(flat, offset), codegen


@njit(cache=True)
def _decay_and_subtract(W, dW, decay):
    """W ← decay·W − dW in one pass (two NumPy calls make two passes over 0.6 MB)."""
    w, d = W.reshape(W.size), dW.reshape(dW.size)
    for i in range(w.size):
        w[i] = w[i] * decay - d[i]

"""The fused mini-batch GD step used by training: in place, into preallocated buffers.

It computes what network.loss_and_grads computes (tests hold the two together) in two compiled
calls: the batch gather, then one numba kernel for the rest, whose five products go to NumPy's
own BLAS through model.blas (the forward GEMM X_b W1, three small ones, the backward GEMM X_bᵀ dH).
The softmax gradient is pre-scaled by η/B, so the products yield update steps directly; the L2
term is a decay W ← (1 − 2ηλ)W − η∇loss, for W2 through BLAS β and for W1 as a pending scale
(see _step and StepParams).

Where the time goes (scripts/bench.py measures it): the two GEMMs with X_b are the floor; the
gather is the next cost: 100 random rows of the uint8 training pixels (3 kB each, from DRAM),
normalised on the fly into 1.2 MB of X_b (reading X's float32 rows instead moves 4× the bytes),
each row's loads requested while the row before it is converted.
The rest was ~25 NumPy calls on small arrays, a few µs each whatever their size, until they became
one kernel. W1's update was the backward GEMM into a gradient buffer (np.matmul overwrites its
output, and OpenBLAS zeroes it first in a pass of its own) and then a pass W1 ← decay·W1 − ∇;
accumulating into W1 with a pending scale removes both passes (~0.044 ms), and with all products
on NumPy's BLAS and the GEMMs inside the kernel the step lost 8% (~0.088 ms). Measured and
dropped: the decay as BLAS β on W1 (OpenBLAS applies β in its own pass: 1/3 of the gain);
SciPy's BLAS, which numba's np.dot calls (a separate, older OpenBLAS: 5–17% slower on these
shapes); fastmath in the kernel (with it, the finiteness check stopped catching inf scores);
prefetching the whole next batch at once (the prefetch instructions stall as long as the loads
they save).

Dropout and augmentation (off by default; with them off the step computes and draws exactly
what it did before they existed): inverted dropout is two more branches of the kernel's loops
over H and dH, its 16-bit uniform draws filled into the workspace from the run's rng by
draw_noise (a seed still gives bit-identical runs); augmentation moves each image's pixels (flip, translation
with reflected borders) while the gather reads them, so it costs no pass of its own. At m = 1024
with dropout 0.5 and ±4-pixel moves the step takes 1.02–1.05× the two-GEMM floor (scripts/bench.py,
*_m1024): the moved gather 0.23 ms (0.07 unmoved), the draws 0.09 ms, of ~15 ms.

bf16 (TrainConfig.precision, resolved by model.precision): the two large products take bf16
operands (uint16 bits) and accumulate in fp32 (MKL's or oneDNN's bf16 GEMM, model.blas); the
gather rounds the batch to bf16 as it normalises it, W1 stays fp32 (the master weights) and its
bf16 copy is rounded from the backward product's output: with MKL block by block while the block
is in cache, dH packed once into MKL's layout for all the blocks (scripts/bench.py,
bf16_backward_*: on an Intel Xeon with AMX at m = 1024, 0.36–0.39 ms over the backward GEMM
alone, against 2.0–2.2 ms for that GEMM followed by a separate pass over W1, and 1.9 ms for
blocks that each packed dH again); with oneDNN, which has no packed operand, in one pass after
the product (_BLOCK_ELEMENTS). The small layer stays fp32.

Float order: the kernel sums in another order than the NumPy calls it replaced, and W1 is
c·V rounded; a run's figures move at the float32 round-off level, a seed still gives
bit-identical runs (tests/test_train.py), and the step equals the reference to round-off
(tests/test_step.py).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from clr_lambda_search.model.blas import (BF16, gemm, gemm_bf16, gemm_bf16_packed, load_bf16,
                                          pack_b_bf16, packed_b_bf16)
from clr_lambda_search.model.errors import DivergedError

_SIDE, _CHANNELS = 32, 3        # a CIFAR-10 row: 3 colour planes (R, G, B) of 32×32, row-major
IMAGE_D = _CHANNELS * _SIDE * _SIDE  # the row length augmentation needs
DRAW_LEVELS = 1 << 16           # dropout's uniform draws are draws / DRAW_LEVELS (16 bits)


def make_workspace(n_batch, D, m, K, dtype, dropout=0.0, flip=False, shift=0, precision="fp32"):
    """Buffers for one step of at most n_batch samples, and the random draws of the regularisers
    the run asks for (see draw_noise): inverted dropout of the hidden units with probability
    `dropout`, images flipped at random (`flip`) and translated by up to `shift` pixels.
    precision: "fp32", or "bf16" (resolved: model.precision) for bf16 operands of the two large
    products (dtype float32: the master weights and everything else stay fp32)."""
    augment = bool(flip or shift)
    bf16 = precision == "bf16"
    if bf16 and np.dtype(dtype) != np.float32:
        raise ValueError("bf16 products keep float32 master weights: dtype must be float32")
    return {
        # gathered batch, in bf16 straight from the gather when the products take bf16
        "X": np.empty((n_batch, D), dtype=BF16 if bf16 else dtype),
        "H": np.empty((n_batch, m), dtype=dtype),   # hidden activations
        "S": np.empty((n_batch, K), dtype=dtype),   # scores, then η/B·(P − Y)
        "dH": np.empty((n_batch, m), dtype=dtype),
        "dH16": np.empty((n_batch, m), dtype=BF16) if bf16 else None,  # dH's bf16 operand
        # elements of V per backward product (0: one product) and dH's bf16 operand packed for
        # those products: set by the first bf16 step (_packed_dH), by the library loaded
        "bf16_block": None, "dH16_packed": None,
        "bf16": bf16,
        "dropout": float(dropout), "flip": bool(flip), "shift": int(shift),
        # uniform draws u of 16 bits: hidden unit j of sample i is dropped where
        # draws[i, j] / DRAW_LEVELS < dropout (all the top level until drawn: nothing dropped);
        # empty without dropout
        "draws": np.full((n_batch if dropout else 0, m), DRAW_LEVELS - 1, dtype=np.uint16),
        "drop_below": int(np.ceil(dropout * DRAW_LEVELS)),  # u < p ⟺ draw < ⌈p·DRAW_LEVELS⌉
        # per sample (flip 0/1, dx, dy) of the augmentation (zeros until drawn), or None
        "moves": np.zeros((n_batch, 3), dtype=np.int64) if augment else None,
    }


class StepParams(dict):
    """The params dict (W1, b1, W2, b2) that sgd_step updates in place: the same arrays as the
    dict it is made from, and what the step keeps beside them.

    The step keeps W1 as c·V (the L2 decay as a pending scale c, see _step) and, for bf16
    products, V's bf16 copy. Reading W1 through this dict (by key, get, items, values, copy, **,
    pickling) gets W1 itself: a read after steps that left a scale applies it first (settle, one
    pass over W1; later reads cost nothing). Replace W1 only by item assignment; the dict made
    from holds W1 once this one has been read (train() reads it before it returns).
    """

    def __init__(self, params):
        super().__init__(params)
        self.w1_scale = np.ones(1)  # W1 = w1_scale[0] · V
        self.w1_bf16 = None         # bf16(V) (uint16) once a bf16 step needed it

    def settle(self):
        """Apply the pending scale to V (and its bf16 copy), so that V is W1 again."""
        if self.w1_scale[0] != 1.0:
            V = dict.__getitem__(self, "W1")
            if self.w1_bf16 is None:
                _rescale(V, self.w1_scale)
            else:
                _rescale_rounded(V, self.w1_scale, self.w1_bf16)

    def bf16_copy(self):
        """V's bf16 copy, made on the first call (one pass) and kept up to date by the step."""
        if self.w1_bf16 is None:
            V = dict.__getitem__(self, "W1")
            self.w1_bf16 = np.empty(V.shape, BF16)
            _round_bf16(V, self.w1_bf16)
        return self.w1_bf16

    def __getitem__(self, key):
        if key == "W1":
            self.settle()
        return dict.__getitem__(self, key)

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, value)
        if key == "W1":
            self.w1_scale[0], self.w1_bf16 = 1.0, None

    def __iter__(self):  # not dict's own: dict(p) and {**p} then read through __getitem__
        return iter(dict.keys(self))

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        self.settle()
        return dict.items(self)

    def values(self):
        self.settle()
        return dict.values(self)

    def copy(self):
        """A plain dict of the (settled) arrays themselves, as dict.copy gives."""
        return dict(self.items())

    def __reduce__(self):  # pickled (sent to another process) as the plain dict it stands for
        return dict, (self.copy(),)


def draw_noise(ws, B, rng):
    """Draw the next step's augmentation moves and dropout draws for B samples from rng into ws,
    in that order; draws nothing when the workspace has neither, so that a run without them
    takes exactly the random numbers it took before they existed."""
    if ws["moves"] is not None:
        moves = ws["moves"][:B]
        if ws["flip"]:
            moves[:, 0] = rng.integers(0, 2, B)
        if ws["shift"]:
            moves[:, 1:] = rng.integers(-ws["shift"], ws["shift"] + 1, (B, 2))
    if ws["dropout"]:
        # 16 random bits per unit, four per 64-bit output of the generator: ~4× cheaper than
        # rng.random's floats (0.06 vs 0.2 ms at m = 1024), dropping at a rate of p rounded up
        # to a multiple of 2⁻¹⁶
        draws = ws["draws"][:B].reshape(-1)
        draws[:] = rng.bit_generator.random_raw(-(-draws.size // 4)).view(np.uint16)[:draws.size]


def sgd_step(params, X, y, idx, eta, lam, ws, pixels=None):
    """One update of params (a StepParams, in place) on the samples X[idx], y[idx] with step
    size eta; W1's L2 decay stays pending in params until W1 is read (see StepParams).

    idx must hold valid row numbers 0 <= i < len(X) (train() passes slices of a permutation).
    pixels: X's model.dataset.Pixels or None (see gather_batch).
    Dropout and augmentation use the draws in ws as they are: draw_noise fills them first.
    Raises DivergedError when the scores stop being finite (params are then left unchanged).
    """
    if not isinstance(params, StepParams):
        raise TypeError("sgd_step updates a model.step.StepParams (StepParams(params))")
    Xb = ws["X"][:len(idx)]
    gather_batch(X, idx, Xb, pixels, ws["moves"])
    W1 = dict.__getitem__(params, "W1")  # V, without settling (the step keeps W1 = c·V)
    if ws["bf16"]:
        if ws["dH16_packed"] is None:
            _packed_dH(ws)
        done = _step(Xb, y, idx, W1, params.bf16_copy(), params["b1"], params["W2"], params["b2"],
                     eta, lam, params.w1_scale, ws["H"], ws["S"], ws["dH"],
                     (ws["dH16"], ws["dH16_packed"], ws["bf16_block"]),
                     ws["draws"], ws["drop_below"], ws["dropout"])
    else:
        done = _step(Xb, y, idx, W1, None, params["b1"], params["W2"], params["b2"], eta, lam,
                     params.w1_scale, ws["H"], ws["S"], ws["dH"], None, ws["draws"],
                     ws["drop_below"], ws["dropout"])
    if not done:
        raise DivergedError("non-finite scores")


def _packed_dH(ws):
    """Set ws's backward blocks (unless set: tests force blocks) and its buffer for dH's bf16
    operand packed for them, on the first bf16 step (so that a bf16 workspace, e.g. for
    batch_source's rows, needs no bf16 library until it steps)."""
    library, why = load_bf16()
    if not library:  # model.precision refuses bf16 before a run starts; this is a direct call
        raise RuntimeError(f"bf16 products need a bf16 GEMM: {why}")
    if ws["bf16_block"] is None:
        ws["bf16_block"] = _BLOCK_ELEMENTS if library == "MKL" else 0
    (n_batch, D), m = ws["X"].shape, ws["H"].shape[1]
    ws["dH16_packed"] = packed_b_bf16(D, m, n_batch) if ws["bf16_block"] else np.empty(0, BF16)


def gather_batch(X, idx, out, pixels=None, moves=None):
    """out ← X[idx], rounded to bf16 when out is bf16 (uint16) and X is not. From X's pixels
    (model.dataset.Pixels) when given and they normalise into out's dtype (float32 for bf16):
    the same rows, bit for bit, from a quarter of the bytes; else from X itself.

    moves: None, or per sample (flip, dx, dy) (see draw_noise and _gather_moved): the images are
    flipped and translated while gathered. This needs the pixels, in out's dtype, of 32×32 RGB
    images (rows of 3072: model.train checks it before training)."""
    if moves is not None:
        if not can_augment(X, pixels, out.dtype):
            raise ValueError("augmentation moves the pixels of 32×32×3 images in out's dtype")
        _gather_moved(pixels.raw, idx, pixels.scale, pixels.shift, moves, out)
    elif pixels is not None and pixels.scale.dtype == _computed(out.dtype):
        _gather_normalised(pixels.raw, idx, pixels.scale, pixels.shift, out)
    elif X.dtype == out.dtype:  # (bf16 X: batch_source's rows, rounded already)
        # mode="clip" because with the default mode="raise" NumPy gathers into a temporary and
        # copies it into `out`, which doubles the cost; idx is in range, so nothing is clipped.
        np.take(X, idx, axis=0, out=out, mode="clip")
    elif out.dtype == BF16:
        _gather_rounded(X, idx, out)
    else:
        out[...] = X[idx]  # data in another dtype than the params: cast (np.take warns doing so)


def batch_source(X, pixels, ws):
    """(rows, pixels) for sgd_step to gather the batches of X from. For bf16 products without
    augmentation: X's rows rounded to bf16 once, as gather_batch rounds a batch (bit for bit),
    and no pixels, so that a batch is a copy of half an fp32 batch's bytes, neither normalised
    nor rounded per step (m = 50: 0.09 ms, against 0.13 ms for normalising and rounding and
    0.11 ms for normalising an fp32 batch); up to ROUNDED_ROWS_BYTES, past which the step
    rounds each batch. Otherwise (X, pixels) as given."""
    if not ws["bf16"] or ws["moves"] is not None or rounded_rows_bytes(X.shape) is None:
        return X, pixels
    rows, every = np.empty(X.shape, BF16), np.arange(X.shape[0])
    gather_batch(X, every, rows, pixels)
    return rows, None


def rounded_rows_bytes(shape):
    """The bytes of batch_source's bf16 rows for training rows of this shape, or None past
    ROUNDED_ROWS_BYTES (then none are made)."""
    size = 2 * shape[0] * shape[1]
    return size if size <= ROUNDED_ROWS_BYTES else None


# bf16 training rows kept at most (CIFAR-10's 49,000 × 3072: 0.3 GB)
ROUNDED_ROWS_BYTES = 1 << 30


def _computed(dtype):
    """The dtype a batch of out's dtype is normalised in: float32 for bf16 (rounded after)."""
    return np.dtype(np.float32) if np.dtype(dtype) == BF16 else np.dtype(dtype)


def can_augment(X, pixels, dtype):
    """Whether the batches of X can be augmented: its rows are 32×32 RGB images and its pixels
    (model.dataset.Pixels) normalise into dtype."""
    return (X.shape[1] == IMAGE_D and pixels is not None
            and pixels.scale.dtype == _computed(dtype))


@njit(cache=True)
def _step(Xb, y, idx, W1, W1c, b1, W2, b2, eta, lam, w1_scale, H, S, dH, dH16, draws,
          drop_below, p):
    """Everything after the gather, in place. Returns False, changing no parameter, if a score is
    not finite.

    Inverted dropout when p > 0: hidden unit j of sample i is dropped where draws[i, j] <
    drop_below, the others are scaled by 1/(1 − p); its backward pass is the same factor on dH. With p = 0 the
    loops are the ones of the step before dropout existed (bit-identical runs).

    W1 is kept as c·V (c = w1_scale[0], V = the array W1): the decay W1 ← (1 − 2ηλ)·W1 then costs
    nothing, c shrinks instead, and the backward GEMM adds −η∇W1 / c straight into V (BLAS β = 1).
    A gradient buffer and two passes over W1's 0.6 MB per step go (OpenBLAS zeroes a β = 0 output
    in a pass of its own). V is rescaled only when c would fall below _RESCALE_BELOW.
    """
    B = idx.shape[0]
    H, S, dH = H[:B], S[:B], dH[:B]
    scale = eta / B                         # turns the gradients into update steps
    decay = 1.0 - 2.0 * eta * lam           # the L2 term
    c = w1_scale[0]
    _forward(Xb, W1, W1c, H, c)             # X_b W1
    if p > 0.0:
        _relu_dropout(H, b1, draws, drop_below, 1.0 / (1.0 - p))
    else:
        _relu(H, b1)
    gemm(H, W2, S, 1.0, 0.0)
    finite = True
    for i in range(B):                      # S ← scale·(softmax(H W2 + b2) − onehot(y))
        s = S[i]
        K = s.shape[0]
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
        s[y[idx[i]]] -= scale
    if not finite:
        return False
    gemm(S, W2, dH, 1.0, 0.0, trans_b=True)  # through W2 (before it changes) and the ReLU
    # dH through the ReLU (and dropout: a dropped unit has H = 0, no gradient either; without
    # dropout kept is 1, and x·1 is x exactly), and b1's gradient, the column sums of dH, in the
    # same row-major pass: summed down each column in the order of dH[:, j].sum(), so bit for
    # bit the same, but 0.004 ms at m = 1024 instead of 0.21 ms for a strided sum per column
    kept = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    db1 = np.zeros(b1.shape[0], dH.dtype)
    for i in range(B):
        for j in range(dH.shape[1]):
            dH[i, j] = dH[i, j] * kept if H[i, j] > 0.0 else 0.0
            db1[j] += dH[i, j]
    for k in range(b2.shape[0]):
        b2[k] -= S[:, k].sum()
    for j in range(b1.shape[0]):
        b1[j] -= db1[j]
    gemm(H, S, W2, -1.0, decay, trans_a=True)      # W2 ← decay·W2 − η∇W2
    c_next = c * decay
    if not abs(c_next) >= _RESCALE_BELOW:   # a decay of 0 (2ηλ = 1) included
        w1_scale[0] = c_next
        _rescale(W1, w1_scale)
        c_next = 1.0
    _backward(Xb, dH, dH16, W1, W1c, -1.0 / c_next)  # V ← V − η∇W1 / c_next
    w1_scale[0] = c_next
    return True


_RESCALE_BELOW = 1e-4  # keeps V = W1 / c and the GEMM's α = 1/c far from float32's range limits


@njit(cache=True)
def _relu(H, b1):
    """H ← relu(H + b1), NaN kept (max() would drop it)."""
    for i in range(H.shape[0]):
        h = H[i]
        for j in range(h.shape[0]):
            v = h[j] + b1[j]
            h[j] = 0.0 if v < 0.0 else v


@njit(cache=True)
def _relu_dropout(H, b1, draws, drop_below, kept):
    """H ← relu(H + b1)·mask, the mask 0 where draws < drop_below and `kept` elsewhere; a NaN
    stays NaN (NaN·0 is NaN), so that a diverged W1 still reaches the scores."""
    for i in range(H.shape[0]):
        h, u = H[i], draws[i]
        for j in range(h.shape[0]):
            v = h[j] + b1[j]
            v = 0.0 if v < 0.0 else v
            h[j] = v * kept if u[j] >= drop_below else v * 0.0


@njit(cache=True)
def _rescale(W, w_scale):
    """W ← w_scale[0]·W in one pass, and w_scale[0] ← 1."""
    w, c = W.reshape(W.size), w_scale[0]
    if c != 1.0:
        for i in range(w.size):
            w[i] = w[i] * c
        w_scale[0] = 1.0


def _forward(Xb, W1, W1c, H, c):
    """H ← c·X_b W1: in fp32, or with bf16 operands (Xb and W1's copy W1c) when W1c is given."""


@overload(_forward)
def _forward_impl(Xb, W1, W1c, H, c):
    if isinstance(W1c, types.NoneType):
        return lambda Xb, W1, W1c, H, c: gemm(Xb, W1, H, c, 0.0)
    return lambda Xb, W1, W1c, H, c: gemm_bf16(Xb, W1c, H, c, 0.0, False, 0, H.shape[0])


def _backward(Xb, dH, dH16, W1, W1c, alpha):
    """V ← V + alpha·X_bᵀ dH: in fp32, or with bf16 operands when W1c is given (dH16: dH's bf16
    buffer, its packed one and the block size; dH rounded into the first, then _backward_bf16)."""


@overload(_backward)
def _backward_impl(Xb, dH, dH16, W1, W1c, alpha):
    if isinstance(W1c, types.NoneType):
        return lambda Xb, dH, dH16, W1, W1c, alpha: gemm(Xb, dH, W1, alpha, 1.0, trans_a=True)

    def bf16(Xb, dH, dH16, W1, W1c, alpha):
        # alpha goes into dH's rounding, not into the GEMM: MKL's unpacked bf16 GEMM with β = 1
        # and α ≠ 1 makes a pass over V of its own (the one product at m = 50: 0.16 ms against
        # 0.115 with α = 1); bf16(α·dH) costs nothing measurable over bf16(dH)
        B = dH.shape[0]
        rounded, packed, block = dH16
        _round_scaled_bf16(dH, alpha, rounded[:B])
        _backward_bf16(Xb, rounded[:B], packed, W1, W1c, block)
    return bf16


@njit(cache=True)
def _backward_bf16(Xb, dH16, packed, V, Vc, block):
    """V ← V + X_bᵀ dH (bf16 operands, fp32 V) and Vc ← bf16(V), in blocks of `block` elements
    of V's rows: each block is rounded while it is still in cache from the product. dH is packed
    once (`packed`, model.blas.packed_b_bf16) for all the blocks' products. With block 0, or a
    small V, one product and then the rounding pass."""
    D, m = V.shape
    if block == 0 or D * m <= _ONE_PRODUCT_ELEMENTS:
        gemm_bf16(Xb, dH16, V, 1.0, 1.0, True, 0, D)
        _round_bf16(V, Vc)
        return
    pack_b_bf16(dH16, packed, D)
    rows = max(1, block // m)
    for r0 in range(0, D, rows):
        r1 = min(D, r0 + rows)
        gemm_bf16_packed(Xb, packed, V, 1.0, 1.0, True, r0, r1)
        _round_bf16(V[r0:r1], Vc[r0:r1])


# elements of V per product of _backward_bf16 (0.5 MB: 128 rows at m = 1024), measured with MKL
# on an Intel Xeon with AMX (m = 50 … 2048, blocks of 32 … 3072 rows): with dH packed once,
# smaller blocks were no faster and larger ones leave the cache before they are rounded; at
# m = 50 the same size is 2 products, not 24 (each call costs MKL's own overhead). oneDNN has no
# packed B: each block's call packs dH again, and on an AMD Zen 5 at m = 1024 blocks of 128 rows
# took 1.67–1.71 ms against 1.57–1.61 for one product and then the pass, so with oneDNN it is one
# product (_packed_dH)
_BLOCK_ELEMENTS = 128 * 1024
_ONE_PRODUCT_ELEMENTS = 256 * 1024


@njit(cache=True)
def _rescale_rounded(W, w_scale, Wc):
    """_rescale, and Wc ← bf16(W) in the same pass."""
    w, wc, c = W.reshape(W.size), Wc.reshape(Wc.size), w_scale[0]
    for i in range(w.size):
        w[i] = w[i] * c
        wc[i] = _bf16(w[i])
    w_scale[0] = 1.0


@njit(cache=True)
def _round_bf16(A, out):
    """out ← bf16(A) for a float32 A and a uint16 out of A's shape (both C-contiguous)."""
    a, o = A.reshape(A.size), out.reshape(out.size)
    for i in range(a.size):
        o[i] = _bf16(a[i])


@njit(cache=True)
def _round_scaled_bf16(A, alpha, out):
    """out ← bf16(alpha·A), the product in float32 (A float32, out uint16 of A's shape)."""
    a, o, k = A.reshape(A.size), out.reshape(out.size), np.float32(alpha)
    for i in range(a.size):
        o[i] = _bf16(a[i] * k)


@njit(cache=True)
def _gather_rounded(X, idx, out):
    """out[i] = bf16(X[idx[i]] as float32)."""
    for i in range(idx.shape[0]):
        row, o = X[idx[i]], out[i]
        for d in range(row.shape[0]):
            o[d] = _bf16(np.float32(row[d]))


@njit(inline="always")
def _bf16(v):
    """The bf16 nearest to the float32 v (ties to even), as its 16 bits; NaN stays NaN (rounding
    its bits could carry into the exponent and make it inf)."""
    return _bf16_bits(np.float32(v))


@intrinsic
def _bf16_bits(typingctx, x):
    """_bf16 in LLVM IR: written in Python, numba widens uint32 arithmetic to 64 bits, which
    halves the vector lanes of every rounding loop (W1's copy at m = 50: 0.037 → 0.026 ms here);
    the NaN test is one unordered compare. Plain integer IR: no CPU-specific instruction."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k = lambda value: ir.Constant(i32, value)  # noqa: E731
        u = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(u, k(16)), k(1))
        nearest = builder.add(builder.add(u, k(0x7FFF)), lsb)
        quiet = builder.or_(u, k(0x400000))  # NaN: its own bits, quieted, never rounded
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        kept = builder.select(nan, quiet, nearest)
        return builder.trunc(builder.lshr(kept, k(16)), ir.IntType(16))
    return types.uint16(types.float32), codegen


def _stored(v, out):
    """v as an element of out: rounded to bf16 when out is bf16 (uint16). Compiled code only."""


@overload(_stored)
def _stored_impl(v, out):
    if out.dtype == types.uint16:
        return lambda v, out: _bf16(v)
    return lambda v, out: v


@njit(cache=True)
def _gather_normalised(raw, idx, scale, shift, out):
    """out[i] = raw[idx[i]]·scale + shift, rounded as model.dataset.normalise rounds it.

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
                o_[d] = _stored(_normalised(r[d], sc[d], sh[d]), o_)
        for d in range(whole_lines, D):
            o[d] = _stored(_normalised(row[d], scale[d], shift[d]), o)


@njit(cache=True)
def _gather_moved(raw, idx, scale, shift, moves, out):
    """out[i] = the image raw[idx[i]] flipped left-right if moves[i, 0], then translated by
    moves[i, 1] columns (right) and moves[i, 2] rows (down), borders reflected (_reflect); then
    normalised, each pixel with the scale and shift of the position it moves to (the statistics
    are per position, and augmentation makes new images). The next image's cache lines are
    requested while this one is converted, as in _gather_normalised."""
    flat = raw.reshape(raw.size)
    D = raw.shape[1]
    cols = np.empty(_SIDE, np.int64)
    line_values = np.empty(_SIDE, scale.dtype)  # _moved_line's buffer
    for i in range(idx.shape[0]):
        row, o = raw[idx[i]], out[i]
        ahead = idx[i + 1] * D if i + 1 < idx.shape[0] else -1
        flip, dx, dy = moves[i, 0], moves[i, 1], moves[i, 2]
        for c in range(_SIDE):              # the source column of each output column
            source = _reflect(c - dx)
            cols[c] = _SIDE - 1 - source if flip else source
        for line in range(_CHANNELS * _SIDE):  # one row of one colour plane: 32 pixels
            if ahead >= 0 and line % 2 == 0:   # two of them make a cache line
                _prefetch(flat, ahead + line * _SIDE)
            plane = line - line % _SIDE
            src = (plane + _reflect(line - plane - dy)) * _SIDE
            _moved_line(row, src, cols, scale, shift, o, line * _SIDE, line_values)


def _moved_line(row, src, cols, scale, shift, o, dst, line_values):
    """o[dst + c] ← row[src + cols[c]] normalised with the scale and shift of dst + c, for the 32
    columns c of one line (rounded to bf16 when o is bf16). Compiled code only."""


@overload(_moved_line, inline="always")
def _moved_line_impl(row, src, cols, scale, shift, o, dst, line_values):
    if o.dtype != types.uint16:
        def direct(row, src, cols, scale, shift, o, dst, line_values):
            for c in range(_SIDE):
                o[dst + c] = _normalised(row[src + cols[c]], scale[dst + c], shift[dst + c])
        return direct

    def rounded(row, src, cols, scale, shift, o, dst, line_values):
        # normalised into line_values, then rounded in a loop of its own: the loop that gathers
        # through cols is not vectorised, the rounding one is (bf16 at m = 1024: 0.33 → 0.21 ms
        # a batch; the fp32 gather, one loop, takes 0.15)
        for c in range(_SIDE):
            line_values[c] = _normalised(row[src + cols[c]], scale[dst + c], shift[dst + c])
        o_ = o[dst:dst + _SIDE]
        for c in range(_SIDE):
            o_[c] = _bf16(line_values[c])
    return rounded


@njit(inline="always")
def _reflect(i):
    """Index i of a row or column reflected into 0..31 at the borders (no edge repeated, as
    np.pad's "reflect"): −1 → 1, 32 → 30; valid for −31 ≤ i ≤ 62.

    Reflection, not zeros: a zero pixel is black, an edge no real image has and, normalised, a
    strong input of its own; reflected pixels keep the image's statistics up to the border (the
    reference check in DESIGN.md used it too)."""
    if i < 0:
        return -i
    if i >= _SIDE:
        return 2 * (_SIDE - 1) - i
    return i



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

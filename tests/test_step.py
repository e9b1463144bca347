"""The fused in-place SGD step against the reference params − η·grads of network.loss_and_grads."""
import numpy as np
import pytest

from clr_lambda_search.model.errors import DivergedError
from clr_lambda_search.model.network import PARAM_KEYS, init_params, loss_and_grads
from clr_lambda_search.model.dataset import Pixels, normalise, normaliser
from clr_lambda_search.model.step import StepParams, gather_batch, make_workspace, sgd_step

D, M, K, N_BATCH = 20, 10, 10, 10


def reference_update(params, X, y, idx, eta, lam):
    """What one GD step must produce: params − η·∇cost on the batch X[idx], in float64."""
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    _, _, grads = loss_and_grads(p64, X[idx].astype(np.float64), y[idx], lam)
    return {k: p64[k] - eta * grads[k] for k in PARAM_KEYS}


def fused_update(params, X, y, idx, eta, lam, dtype):
    p = StepParams({k: v.astype(dtype) for k, v in params.items()})
    ws = make_workspace(N_BATCH, D, M, K, dtype)
    ids = {k: id(v) for k, v in p.items()}
    sgd_step(p, X.astype(dtype), y, idx, eta, lam, ws)
    assert {k: id(v) for k, v in p.items()} == ids  # updated in place, same arrays
    assert all(v.dtype == dtype for v in p.values())
    return p


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("batch", ["full", "partial"])
def test_sgd_step_equals_reference_float64(tiny_data, tiny_params, lam, batch):
    X, y = tiny_data.train.X, tiny_data.train.y
    # a shuffled gather, and for "partial" a last batch of 3 in a workspace sized for 10
    idx = np.random.default_rng(5).permutation(len(y))[:N_BATCH if batch == "full" else 3]
    eta = 0.05
    expected = reference_update(tiny_params, X, y, idx, eta, lam)
    got = fused_update(tiny_params, X, y, idx, eta, lam, np.float64)
    for k in PARAM_KEYS:
        # same math in a different order: equal to float64 round-off
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-12, atol=1e-12, err_msg=k)
        assert not np.array_equal(got[k], tiny_params[k]), k  # the step did move every key


def test_sgd_step_float32_close_to_float64_reference(tiny_data, tiny_params):
    X, y = tiny_data.train.X.astype(np.float32), tiny_data.train.y
    p32 = {k: v.astype(np.float32) for k, v in tiny_params.items()}
    idx = np.arange(7, 7 + N_BATCH)
    expected = reference_update(p32, X, y, idx, 0.05, 0.1)
    got = fused_update(p32, X, y, idx, 0.05, 0.1, np.float32)
    for k in PARAM_KEYS:
        # float32 round-off (eps 1.2e-7) over sums of ~20 terms: 1e-5 relative, with a 1e-6 floor
        # for entries (e.g. the biases after one step) that are themselves small
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_workspace_reuse_across_batch_sizes(tiny_data, tiny_params):
    """A full batch, then a partial one, then a full one through the same workspace."""
    X, y = tiny_data.train.X, tiny_data.train.y
    ws = make_workspace(N_BATCH, D, M, K, np.float64)
    fused = StepParams({k: v.copy() for k, v in tiny_params.items()})
    ref = {k: v.copy() for k, v in tiny_params.items()}
    for idx in (np.arange(0, 10), np.arange(50, 53), np.arange(20, 30)):
        sgd_step(fused, X, y, idx, 0.05, 0.01, ws)
        ref = reference_update(ref, X, y, idx, 0.05, 0.01)
    for k in PARAM_KEYS:
        # stale rows from a previous, larger batch never leak into a smaller one
        np.testing.assert_allclose(fused[k], ref[k], rtol=1e-11, atol=1e-12, err_msg=k)


def test_sgd_step_leaves_the_data_alone(tiny_data, tiny_params):
    X, y = tiny_data.train.X.copy(), tiny_data.train.y.copy()
    sgd_step(StepParams({k: v.copy() for k, v in tiny_params.items()}), X, y, np.arange(10), 0.05,
             0.1, make_workspace(N_BATCH, D, M, K, np.float64))
    np.testing.assert_array_equal(X, tiny_data.train.X)
    np.testing.assert_array_equal(y, tiny_data.train.y)


@pytest.mark.parametrize("eta,lam", [(0.05, 0.0), (0.05, 0.02), (0.5, 0.5), (0.5, 1.0), (0.5, 1.5)],
                         ids=["no decay", "pending scale", "rescaled", "zero decay", "negative decay"])
def test_many_steps_with_the_w1_scale_pending(tiny_data, tiny_params, eta, lam):
    """The W1 decay is a pending scale: with 2ηλ = 0.002, 40 steps leave W1 = 0.92·V (the array
    the step updates) until W1 is read, and reading it gets W1 itself; with 2ηλ = 0.5 the scale drops below the rescale bound within the run; with
    2ηλ = 1 the decay is 0 (W1 ← −η∇loss), with 2ηλ = 1.5 negative. Every case ends where 40
    reference steps end."""
    X, y = tiny_data.train.X, tiny_data.train.y
    ws = make_workspace(N_BATCH, D, M, K, np.float64)
    plain = {k: v.copy() for k, v in tiny_params.items()}
    fused = StepParams(plain)
    ref = {k: v.copy() for k, v in tiny_params.items()}
    rng = np.random.default_rng(1)
    for _ in range(40):
        idx = rng.permutation(len(y))[:N_BATCH]
        sgd_step(fused, X, y, idx, eta, lam, ws)
        ref = reference_update(ref, X, y, idx, eta, lam)
    pending = (1 - 2 * eta * lam) ** 40
    if lam == 0.02:
        np.testing.assert_allclose(fused.w1_scale[0], pending, rtol=1e-12)
        # the array itself is V = W1 / pending until W1 is read through the StepParams
        np.testing.assert_allclose(pending * plain["W1"], ref["W1"], rtol=1e-9, atol=1e-12)
    read = fused["W1"]
    assert fused.w1_scale[0] == 1.0 and read is plain["W1"]  # settled in place, on the read
    for k in PARAM_KEYS:
        np.testing.assert_allclose(fused[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")
def test_sgd_step_raises_diverged_on_non_finite_scores(tiny_data):
    params = init_params(D, M, K, np.random.default_rng(0), dtype=np.float64)
    params["W2"][0, 0] = np.inf
    params["b1"][:] = 1.0  # make sure hidden unit 0 is active, so a score becomes inf or NaN
    with pytest.raises(DivergedError):
        sgd_step(StepParams(params), tiny_data.train.X, tiny_data.train.y, np.arange(10), 0.05,
                 0.0, make_workspace(N_BATCH, D, M, K, np.float64))


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")
def test_sgd_step_raises_diverged_on_nan_weights_and_leaves_params(tiny_data):
    """A NaN in W1 reaches the scores through the ReLU (it must not be clipped to 0), and the
    failed step changes no parameter."""
    params = init_params(D, M, K, np.random.default_rng(0), dtype=np.float64)
    params["W1"][:, 0] = np.nan
    before = {k: v.copy() for k, v in params.items()}
    ws = make_workspace(N_BATCH, D, M, K, np.float64)
    stepped = StepParams(params)
    stepped.w1_scale[0] = 0.5
    with pytest.raises(DivergedError):
        sgd_step(stepped, tiny_data.train.X, tiny_data.train.y, np.arange(10), 0.05, 0.1, ws)
    assert stepped.w1_scale[0] == 0.5  # the pending scale is a parameter too
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(params[k], before[k], err_msg=k)


def test_sgd_step_computes_in_the_params_dtype(tiny_data, tiny_params):
    """float64 data with float32 params: the gather casts the batch, and the step is the one
    it would be on float32 data (train() sizes the workspace in the params' dtype)."""
    X, y = tiny_data.train.X, tiny_data.train.y
    idx = np.arange(3, 3 + N_BATCH)
    on64 = StepParams({k: v.astype(np.float32) for k, v in tiny_params.items()})
    ws = make_workspace(N_BATCH, D, M, K, np.float32)
    sgd_step(on64, X, y, idx, 0.05, 0.1, ws)
    on32 = fused_update(tiny_params, X, y, idx, 0.05, 0.1, np.float32)
    for k in PARAM_KEYS:
        assert on64[k].dtype == np.float32
        np.testing.assert_array_equal(on64[k], on32[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("D_px,B", [(100, 7), (64, 3), (3072, 1), (1, 5)])
def test_pixel_gather_any_row_length_and_batch(dtype, D_px, B):
    """The gather walks the rows in 64-pixel cache lines and prefetches the next row: rows that
    end mid-line, a single line, a batch of one (nothing ahead) all give X's rows bit for bit."""
    rng = np.random.default_rng(D_px + B)
    raw = rng.integers(0, 256, (40, D_px), dtype=np.uint8)
    scale, shift = normaliser(rng.uniform(0.2, 0.8, D_px), rng.uniform(0.1, 0.3, D_px), dtype)
    X = normalise(raw, scale, shift)
    idx = rng.permutation(40)[:B]
    out = np.full((B + 2, D_px), np.nan, dtype=dtype)  # rows beyond the batch stay untouched
    gather_batch(X, idx, out[:B], Pixels(raw, scale, shift))
    np.testing.assert_array_equal(out[:B], X[idx])
    assert np.isnan(out[B:]).all()

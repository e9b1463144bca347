"""Dropout, augmentation and snapshot ensembles (issue 17): the step's kernels against plain NumPy
references, the run's rng as their only source of randomness, and bad settings refused."""
import dataclasses

import numpy as np
import pytest

from conftest import pixel_data
from clr_lambda_search.model.dataset import Dataset, Pixels, Split, normalise, normaliser
from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.gradcheck import check_gradients
from clr_lambda_search.model.layers import dropout_mask, softmax
from clr_lambda_search.model.network import PARAM_KEYS, init_params, loss_and_grads, scores
from clr_lambda_search.model.step import (DRAW_LEVELS, IMAGE_D, StepParams, draw_noise, gather_batch,
                        make_workspace, sgd_step)
from clr_lambda_search.model.train import TrainConfig, evaluate, evaluate_ensemble, fit

SIDE = 32


def moved_image(image, flip, dx, dy):
    """The augmentation in plain NumPy: a row of 3072 pixels (planes R, G, B of 32×32) flipped
    left-right if flip, then translated dx columns right and dy rows down, the borders filled by
    reflection (np.pad's "reflect", no edge pixel repeated)."""
    planes = image.reshape(3, SIDE, SIDE)
    if flip:
        planes = planes[:, :, ::-1]
    s = max(abs(dx), abs(dy))
    padded = np.pad(planes, ((0, 0), (s, s), (s, s)), mode="reflect")
    return padded[:, s - dy:s - dy + SIDE, s - dx:s - dx + SIDE].reshape(IMAGE_D)


def known_image():
    """Two images whose pixels tell where they come from (a uint8 has too few values for one
    image to code plane, row and column at once): 80·plane + row, and 80·plane + 40 + column."""
    plane, row, col = np.meshgrid(np.arange(3), np.arange(SIDE), np.arange(SIDE), indexing="ij")
    return ((plane * 80 + row).astype(np.uint8).reshape(IMAGE_D),
            (plane * 80 + 40 + col).astype(np.uint8).reshape(IMAGE_D))


def gather_moved(images, moves, dtype=np.float64, scale=None, shift=None):
    """The step's gather of `images` (rows of uint8 pixels) in order, moved by `moves`."""
    images = np.ascontiguousarray(images)
    scale = np.ones(IMAGE_D, dtype) if scale is None else scale
    shift = np.zeros(IMAGE_D, dtype) if shift is None else shift
    out = np.empty((len(images), IMAGE_D), dtype)
    gather_batch(normalise(images, scale, shift), np.arange(len(images)), out,
                 Pixels(images, scale, shift), np.asarray(moves, dtype=np.int64))
    return out


# ---- augmentation -------------------------------------------------------------------------------

def test_flip_and_translation_move_known_pixels_where_expected():
    """Hand-written expectations, independent of np.pad: a flip reverses every row; dx = 1 moves
    column c to c + 1 and reflects column 1 into the empty column 0; dy = −2 moves row r to r − 2
    and reflects rows 30 and 29 into rows 30 and 31."""
    rows, cols = known_image()
    img_r, img_c = rows.reshape(3, SIDE, SIDE), cols.reshape(3, SIDE, SIDE)

    flipped = gather_moved([cols], [(1, 0, 0)])[0].reshape(3, SIDE, SIDE)
    np.testing.assert_array_equal(flipped, img_c[:, :, ::-1])
    np.testing.assert_array_equal(gather_moved([rows], [(1, 0, 0)])[0], rows)  # rows stay put

    right = gather_moved([cols], [(0, 1, 0)])[0].reshape(3, SIDE, SIDE)
    np.testing.assert_array_equal(right[:, :, 1:], img_c[:, :, :-1])
    np.testing.assert_array_equal(right[:, :, 0], img_c[:, :, 1])

    up = gather_moved([rows], [(0, 0, -2)])[0].reshape(3, SIDE, SIDE)
    np.testing.assert_array_equal(up[:, :30], img_r[:, 2:])
    np.testing.assert_array_equal(up[:, 30], img_r[:, 30])
    np.testing.assert_array_equal(up[:, 31], img_r[:, 29])

    # flip first, then translate: the flipped image's column 0 (the original's 31) moves to 1
    both = gather_moved([cols], [(1, 1, 0)])[0].reshape(3, SIDE, SIDE)
    np.testing.assert_array_equal(both[:, :, 1], img_c[:, :, 31])
    np.testing.assert_array_equal(both[:, :, 0], img_c[:, :, 30])


@pytest.mark.parametrize("flip", [0, 1])
@pytest.mark.parametrize("dx,dy", [(0, 0), (3, -3), (-1, 2), (4, 0), (0, -4), (31, -31),
                                   (-31, 31), (17, 5)])
def test_moved_pixels_equal_the_numpy_reference(flip, dx, dy):
    """Pixel-exact against np.pad's reflection, up to the largest translation allowed (31)."""
    images = np.stack(known_image() + (np.random.default_rng(abs(dx) + 64 * abs(dy)).integers(
        0, 256, IMAGE_D, dtype=np.uint8),))
    got = gather_moved(images, [(flip, dx, dy)] * 3)
    for g, image in zip(got, images):
        np.testing.assert_array_equal(g, moved_image(image, flip, dx, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_augmented_gather_equals_the_reference_bit_for_bit(dtype):
    """Random rows, random moves, the real normalisation: each gathered row is the reference's
    moved image normalised as model.dataset.normalise does (a moved pixel takes the scale and shift
    of the position it lands on), bit for bit; rows beyond the batch are left alone."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (60, IMAGE_D), dtype=np.uint8)
    scale, shift = normaliser(rng.uniform(0.2, 0.3, IMAGE_D), rng.uniform(0.2, 0.3, IMAGE_D),
                              dtype)
    idx = rng.permutation(60)[:25]
    moves = np.column_stack([rng.integers(0, 2, 25), rng.integers(-5, 6, (25, 2))])
    out = np.full((27, IMAGE_D), np.nan, dtype)
    gather_batch(normalise(raw, scale, shift), idx, out[:25], Pixels(raw, scale, shift), moves)
    expected = normalise(np.stack([moved_image(raw[i], *m) for i, m in zip(idx, moves)]),
                         scale, shift)
    np.testing.assert_array_equal(out[:25], expected)
    assert np.isnan(out[25:]).all()


def test_draw_noise_draws_flips_and_shifts_in_range_from_the_rng():
    ws = make_workspace(400, IMAGE_D, 5, 10, np.float32, flip=True, shift=3)
    draw_noise(ws, 300, np.random.default_rng(0))
    moves = ws["moves"]
    assert set(np.unique(moves[:300, 0])) == {0, 1}
    assert set(np.unique(moves[:300, 1:])) == set(range(-3, 4))  # both borders reached
    assert not moves[300:].any()  # only the batch's rows are drawn
    again = make_workspace(400, IMAGE_D, 5, 10, np.float32, flip=True, shift=3)
    draw_noise(again, 300, np.random.default_rng(0))
    np.testing.assert_array_equal(again["moves"], moves)  # the rng is the only source
    only_shift = make_workspace(10, IMAGE_D, 5, 10, np.float32, shift=2)
    draw_noise(only_shift, 10, np.random.default_rng(0))
    assert not only_shift["moves"][:, 0].any() and only_shift["moves"][:, 1:].any()


# ---- dropout ------------------------------------------------------------------------------------

def test_draw_noise_draws_uniform_16_bit_levels_for_the_batch_only():
    ws = make_workspace(120, 20, 500, 10, np.float32, dropout=0.3)
    draw_noise(ws, 100, np.random.default_rng(0))
    u = ws["draws"][:100] / DRAW_LEVELS
    assert abs(u.mean() - 0.5) < 0.005 and u.min() < 0.001 and u.max() > 0.999
    assert abs(np.mean(u < 0.3) - 0.3) < 4 * np.sqrt(0.21 / u.size)
    assert (ws["draws"][100:] == DRAW_LEVELS - 1).all()  # rows beyond the batch: never dropped
    again = make_workspace(120, 20, 500, 10, np.float32, dropout=0.3)
    draw_noise(again, 100, np.random.default_rng(0))
    np.testing.assert_array_equal(again["draws"], ws["draws"])  # the rng is the only source


def test_dropout_mask_rate_and_scaling():
    u = np.random.default_rng(0).random((400, 500))
    for p in (0.1, 0.5, 0.8):
        mask = dropout_mask(u, p)
        assert set(np.unique(mask)) == {0.0, 1.0 / (1.0 - p)}
        assert abs(np.mean(mask == 0) - p) < 4 * np.sqrt(p * (1 - p) / mask.size)
        assert abs(mask.mean() - 1.0) < 0.02  # inverted: the expected activation is unchanged


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_step_drops_hidden_units_at_rate_p_and_scales_the_rest(p):
    """After one step the workspace holds the step's hidden activations: with every unit active
    (large b1), a fraction p of them is 0 and the others are relu(X_b W1 + b1)/(1 − p)."""
    data = pixel_data("float64")
    B, m = 100, 300
    params = init_params(IMAGE_D, m, 10, np.random.default_rng(1), dtype=np.float64)
    params["b1"][:] = 50.0
    before = {k: v.copy() for k, v in params.items()}
    ws = make_workspace(B, IMAGE_D, m, 10, np.float64, dropout=p)
    idx = np.arange(B)
    draw_noise(ws, B, np.random.default_rng(2))
    sgd_step(StepParams(params), data.train.X, data.train.y, idx, 0.01, 0.0, ws,
             data.train.pixels)
    H = ws["H"]
    pre = data.train.X[idx] @ before["W1"] + before["b1"]
    assert (pre > 0).all()
    dropped = H == 0
    np.testing.assert_array_equal(dropped, ws["draws"] / DRAW_LEVELS < p)
    assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / H.size)
    np.testing.assert_allclose(H[~dropped], pre[~dropped] / (1 - p), rtol=1e-12)


@pytest.mark.parametrize("m", [10, 120])
def test_step_with_dropout_equals_the_reference_with_the_same_mask(tiny_data, m):
    """The fused step with a fixed draw equals params − η·∇cost of network.loss_and_grads with
    that draw's mask (float64, to round-off), for a narrow and a wide hidden layer."""
    X, y = tiny_data.train.X, tiny_data.train.y
    p, eta, lam = 0.4, 0.05, 0.02
    params = init_params(20, m, 10, np.random.default_rng(m), dtype=np.float64)
    ws = make_workspace(10, 20, m, 10, np.float64, dropout=p)
    rng = np.random.default_rng(4)
    fused = StepParams({k: v.copy() for k, v in params.items()})
    ref = {k: v.copy() for k, v in params.items()}
    for _ in range(5):
        idx = rng.permutation(len(y))[:10]
        draw_noise(ws, len(idx), rng)
        sgd_step(fused, X, y, idx, eta, lam, ws)
        mask = dropout_mask(ws["draws"][:len(idx)] / DRAW_LEVELS, p)
        _, _, grads = loss_and_grads(ref, X[idx], y[idx], lam, mask=mask)
        ref = {k: ref[k] - eta * grads[k] for k in PARAM_KEYS}
    without = StepParams({k: v.copy() for k, v in params.items()})
    sgd_step(without, X, y, idx, eta, lam, make_workspace(10, 20, m, 10, np.float64))
    for k in PARAM_KEYS:
        np.testing.assert_allclose(fused[k], ref[k], rtol=1e-10, atol=1e-12, err_msg=k)
    assert not np.allclose(fused["W2"], without["W2"])  # the mask did change the update


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_gradient_check_with_a_fixed_dropout_mask_and_a_wide_layer(tiny_data, lam):
    """Centred differences of the cost with the mask held fixed agree with loss_and_grads(mask)
    at m = 64 > 50; and a mask the analytic side ignores is caught."""
    rng = np.random.default_rng(0)
    X = np.ascontiguousarray(tiny_data.train.X[:4], dtype=np.float64)
    y = tiny_data.train.y[:4]
    params = init_params(20, 64, 10, rng, dtype=np.float64)
    mask = dropout_mask(rng.random((4, 64)), 0.5)
    errors = check_gradients(X, y, params, lam, mask=mask)
    assert max(errors.values()) < 1e-7, errors
    assert (mask == 0).any()


def test_gradcheck_report_through_dropout_at_m_above_50(tiny_data):
    from clr_lambda_search.model.gradcheck import gradcheck_report

    report = gradcheck_report(tiny_data.train.X, tiny_data.train.y, np.random.default_rng(0),
                              dims=12, samples=4, m=60, dropout=0.5)
    assert report["passed"]
    assert max(e for c in report["checks"] for e in c["max_rel_error"].values()) < 1e-7


def test_gradient_check_catches_a_mask_the_gradients_ignore(tiny_data, monkeypatch):
    from clr_lambda_search.model import gradcheck

    real = gradcheck.loss_and_grads
    calls = {"n": 0}

    def analytic_without_mask(params, X, y, lam, mask=None):
        calls["n"] += 1
        return real(params, X, y, lam, mask=None if calls["n"] == 1 else mask)

    monkeypatch.setattr(gradcheck, "loss_and_grads", analytic_without_mask)
    rng = np.random.default_rng(0)
    X = np.ascontiguousarray(tiny_data.train.X[:4], dtype=np.float64)
    params = init_params(20, 64, 10, rng, dtype=np.float64)
    errors = check_gradients(X, tiny_data.train.y[:4], params, 0.0,
                             mask=dropout_mask(rng.random((4, 64)), 0.5))
    assert errors["W1"] > 1e-2


# ---- training runs -------------------------------------------------------------------------------

def regularised_config(**kw):
    base = dict(lam=1e-3, m=40, n_batch=50, eta_min=1e-4, eta_max=0.05, n_s=6, cycles=2,
                evals_per_cycle=2, eval_train_samples=100, seed=3, dropout=0.3, flip=True,
                shift=3)
    return TrainConfig(**{**base, **kw})


def test_same_seed_bit_identical_with_dropout_and_augmentation():
    data = pixel_data()
    config = regularised_config()
    (p1, h1), (p2, h2) = fit(data, config), fit(data, config)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
    assert h1 == h2
    p3, _ = fit(data, dataclasses.replace(config, seed=4))
    assert not np.array_equal(p1["W1"], p3["W1"])
    # each regulariser changes the run: its draws are used
    for off in (dict(dropout=0.0), dict(flip=False), dict(shift=0)):
        other, _ = fit(data, dataclasses.replace(config, **off))
        assert not np.array_equal(p1["W1"], other["W1"]), off


def test_evaluation_has_no_dropout():
    """The history's metrics are those of the plain network (no mask, no 1/(1 − p) factor):
    inverted dropout scales in training only."""
    data = pixel_data()
    params, history = fit(data, regularised_config(dropout=0.5))
    S = scores(params, data.val.X)
    assert history[-1]["val"]["acc"] == np.mean(S.argmax(axis=1) == data.val.y)
    assert history[-1]["val"] == evaluate(params, data.val.X, data.val.y, 1e-3)


def test_dropout_and_augmentation_still_learn():
    data = pixel_data()
    _, history = fit(data, regularised_config(m=50, cycles=3, n_s=12, eta_max=0.02))
    assert history[-1]["val"]["acc"] > 0.5  # 10 classes: chance is 0.1


def test_tiny_set_overfits_with_dropout_off_not_with_it(tiny_data):
    small = Split(tiny_data.train.X[:20], tiny_data.train.y[:20])  # random labels: memorising
    data = Dataset(train=small, val=tiny_data.val, test=tiny_data.test, source="synthetic")
    config = TrainConfig(lam=0.0, m=50, n_batch=5, eta_min=1e-3, eta_max=0.1, n_s=20, cycles=2,
                         eval_train_samples=0, dtype="float64")
    _, history = fit(data, config)
    assert history[-1]["train"]["acc"] == 1.0
    _, dropped = fit(data, dataclasses.replace(config, dropout=0.9))
    assert dropped[-1]["train"]["loss"] > 2 * history[-1]["train"]["loss"]


# ---- snapshot ensembles --------------------------------------------------------------------------

def test_snapshots_are_the_params_at_each_cycle_end_and_cost_the_run_nothing():
    data = pixel_data()
    config = regularised_config(cycles=3)
    params, history, snapshots = fit(data, config, snapshots=True)
    plain_params, plain_history = fit(data, config)
    assert history == plain_history
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(params[k], plain_params[k], err_msg=k)
        np.testing.assert_array_equal(snapshots[-1][k], params[k], err_msg=k)
        assert snapshots[-1][k] is not params[k]  # copies
    assert len(snapshots) == config.cycles
    # snapshot c is the network of cycle c's end: its validation metrics are the history's there
    by_step = {r["step"]: r for r in history}
    for c, snap in enumerate(snapshots, start=1):
        assert evaluate(snap, data.val.X, data.val.y, config.lam) == by_step[2 * config.n_s * c]["val"]
    assert not np.array_equal(snapshots[0]["W1"], snapshots[1]["W1"])


def test_ensemble_averages_the_members_softmax(tiny_data):
    X, y = tiny_data.train.X, tiny_data.train.y
    members = [init_params(20, 10, 10, np.random.default_rng(s), dtype=np.float64)
               for s in range(3)]
    one = evaluate_ensemble(members[:1], X, y)
    assert one["acc"] == evaluate(members[0], X, y, 0.0)["acc"]
    assert one["loss"] == pytest.approx(evaluate(members[0], X, y, 0.0)["loss"], rel=1e-12)
    P = np.mean([softmax(scores(p, X)) for p in members], axis=0)
    got = evaluate_ensemble(members, X, y, block=7)  # blocks of rows change nothing
    assert got["members"] == 3
    assert got["acc"] == np.mean(P.argmax(axis=1) == y)
    assert got["loss"] == pytest.approx(-np.mean(np.log(P[np.arange(len(y)), y])), rel=1e-12)


# ---- bad settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"dropout": -0.1}, {"dropout": 1.0}, {"dropout": float("nan")},
                                 {"shift": -1}, {"shift": 32}, {"shift": 1.5},
                                 {"flip": "yes"}])
def test_config_rejects_bad_regularisers(bad):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**bad)
    assert next(iter(bad)) in str(e.value)


def test_config_accepts_the_edges():
    TrainConfig(dropout=0.0, shift=0)
    TrainConfig(dropout=0.99, shift=31, flip=True)
    TrainConfig(shift=np.int64(4))  # what a search space may suggest


@pytest.mark.parametrize("kw", [{"flip": True}, {"shift": 2}])
def test_augmentation_of_rows_that_are_not_images_is_refused(tiny_data, kw):
    """tiny_data's rows have 20 values: one ConfigError naming the problem, before training."""
    config = TrainConfig(m=5, n_batch=10, n_s=3, cycles=1, evals_per_cycle=2, dtype="float64",
                         **kw)
    with pytest.raises(ConfigError, match="rows of 20 values"):
        fit(tiny_data, config)
    fit(tiny_data, dataclasses.replace(config, flip=False, shift=0, dropout=0.5))  # dropout is fine


def test_warm_up_with_the_regularisers_leaves_the_run_as_it_was():
    """warm_up compiles the dropout and augmentation kernels too (forked final seeds inherit
    them): a throwaway step that changes neither the data nor a run afterwards."""
    from clr_lambda_search.model.train import warm_up

    data = pixel_data()
    config = regularised_config()
    before = fit(data, config)
    X = data.train.X.copy()
    warm_up(data, config)
    np.testing.assert_array_equal(data.train.X, X)
    after = fit(data, config)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(before[0][k], after[0][k], err_msg=k)


def test_warm_up_refuses_augmentation_the_data_cannot_take(tiny_data):
    from clr_lambda_search.model.train import warm_up

    with pytest.raises(ConfigError, match="rows of 20 values"):
        warm_up(tiny_data, TrainConfig(m=5, n_batch=10, n_s=3, cycles=1, evals_per_cycle=2,
                                       dtype="float64", shift=2))


def test_augmentation_without_pixels_is_refused():
    data = pixel_data()
    without = dataclasses.replace(data, train=dataclasses.replace(data.train, pixels=None))
    with pytest.raises(ConfigError, match="no uint8 training pixels"):
        fit(without, regularised_config())

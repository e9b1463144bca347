"""The whole network: gradient check, L2 convention, init scale, overfitting, λ's effect."""
import dataclasses

import numpy as np
import pytest

from clr_lambda_search.model.dataset import Dataset, Split
from clr_lambda_search.model.dataset import split_and_normalise
from clr_lambda_search.model.gradcheck import (check_gradients, gradcheck_report, gradcheck_slice, informative_dims,
                             relative_error)
from clr_lambda_search.model.network import PARAM_KEYS, init_params, l2_penalty, loss_and_grads, scores
from clr_lambda_search.model.train import TrainConfig, evaluate, train

# float64 centred differences at h=1e-5 on a smooth-almost-everywhere cost reach ~1e-8 or better;
# a wrong factor (2λ vs λ, a missing 1/N, a transposed product) gives errors of order 1.
GRAD_TOL = 1e-6


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_full_gradient_check(tiny_data, rng, lam):
    X, y, params = gradcheck_slice(tiny_data.train.X, tiny_data.train.y, rng,
                                   dims=20, samples=5, m=10)
    errors = check_gradients(X, y, params, lam)
    assert set(errors) == set(PARAM_KEYS)  # every key is checked
    assert all(e < GRAD_TOL for e in errors.values()), errors


def test_gradient_check_detects_a_wrong_gradient(tiny_data, rng, monkeypatch):
    """check_gradients is not vacuous: a halved L2 gradient is caught on W1 and W2 only."""
    import clr_lambda_search.model.gradcheck as gc

    def wrong(params, X, y, lam, mask=None):
        cost, loss, grads = loss_and_grads(params, X, y, lam, mask)
        return cost, loss, {k: g - lam * params[k] if k.startswith("W") else g
                            for k, g in grads.items()}

    monkeypatch.setattr(gc, "loss_and_grads", wrong)
    X, y, params = gradcheck_slice(tiny_data.train.X, tiny_data.train.y, rng)
    errors = gc.check_gradients(X, y, params, lam=0.5)
    assert errors["W1"] > 1e-3 and errors["W2"] > 1e-3
    assert errors["b1"] < GRAD_TOL and errors["b2"] < GRAD_TOL


def test_l2_convention_lambda_sum_of_squared_weights(tiny_data, tiny_params):
    X, y, lam = tiny_data.train.X, tiny_data.train.y, 0.3
    params = {k: v.copy() for k, v in tiny_params.items()}
    params["b1"] += 5.0  # large biases: they must not enter the penalty
    params["b2"] -= 3.0
    cost, loss, grads = loss_and_grads(params, X, y, lam)
    expected = lam * (np.sum(params["W1"] ** 2) + np.sum(params["W2"] ** 2))
    # cost − loss is exactly λ(‖W1‖² + ‖W2‖²): no ½ factor, no 1/N, biases excluded
    assert cost - loss == pytest.approx(expected, rel=1e-10)
    assert l2_penalty(params, lam) == pytest.approx(expected, rel=1e-12)
    _, loss0, grads0 = loss_and_grads(params, X, y, 0.0)
    assert loss0 == loss  # the data term does not depend on λ
    for k in ("W1", "W2"):  # the penalty's gradient is 2λW ...
        np.testing.assert_allclose(grads[k] - grads0[k], 2 * lam * params[k],
                                   rtol=1e-10, atol=1e-14)
    for k in ("b1", "b2"):  # ... and nothing on the biases
        np.testing.assert_array_equal(grads[k], grads0[k])


def test_initial_loss_is_about_ln_10():
    r = np.random.default_rng(0)
    X = r.standard_normal((500, 3072))  # standardised inputs, CIFAR's D
    y = r.integers(0, 10, 500)
    params = init_params(3072, 50, 10, r, dtype=np.float64)
    _, loss, _ = loss_and_grads(params, X, y, 0.0)
    # With W1 ~ N(0, 1/√D) and W2 ~ N(0, 1/√m) the scores have variance ≈ 0.5, so the loss sits
    # ≈ 0.2 above ln 10; a wrong scale (e.g. std 1 instead of 1/√D) puts it far outside 0.3.
    assert abs(loss - np.log(10)) < 0.3
    # and with the weights scaled down the scores are ~uniform: exactly the ln K reference
    small = {k: v * 1e-3 for k, v in params.items()}
    assert loss_and_grads(small, X, y, 0.0)[1] == pytest.approx(np.log(10), abs=1e-3)


def test_init_params_shapes_dtype_and_scale():
    params = init_params(3072, 50, 10, np.random.default_rng(0))
    assert {k: v.shape for k, v in params.items()} == {
        "W1": (3072, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
    assert all(v.dtype == np.float32 for v in params.values())  # the default dtype
    assert not params["b1"].any() and not params["b2"].any()  # zero biases
    # std 1/√D and 1/√m: 153,600 and 500 draws, so 5% and 15% bounds are many standard errors wide
    assert params["W1"].std() == pytest.approx(1 / np.sqrt(3072), rel=0.05)
    assert params["W2"].std() == pytest.approx(1 / np.sqrt(50), rel=0.15)


def test_scores_match_the_layers(tiny_data, tiny_params):
    X = tiny_data.train.X
    H = np.maximum(X @ tiny_params["W1"] + tiny_params["b1"], 0)
    np.testing.assert_allclose(scores(tiny_params, X), H @ tiny_params["W2"] + tiny_params["b2"],
                               rtol=1e-14, atol=1e-14)


def test_overfits_twenty_examples(tiny_data):
    small = Split(tiny_data.train.X[:20], tiny_data.train.y[:20])  # random labels: pure memorising
    data = Dataset(train=small, val=tiny_data.val, test=tiny_data.test, source="synthetic")
    config = TrainConfig(lam=0.0, m=50, n_batch=5, eta_min=1e-3, eta_max=0.1, n_s=20, cycles=2,
                         eval_train_samples=0, dtype="float64")
    params = init_params(20, 50, 10, np.random.default_rng(0), dtype=np.float64)
    params, history = train(params, data, config, np.random.default_rng(0))
    # every one of the 20 training examples is classified correctly after 80 updates
    assert history[-1]["train"]["acc"] == 1.0
    assert evaluate(params, small.X, small.y, 0.0)["acc"] == 1.0
    assert history[-1]["train"]["loss"] < 0.5 * history[0]["train"]["loss"]


def test_larger_lambda_gives_smaller_weights(tiny_data):
    base = TrainConfig(m=10, n_batch=10, eta_min=1e-3, eta_max=0.1, n_s=20, cycles=1,
                       eval_train_samples=0, dtype="float64")

    def weight_norm(lam):
        config = dataclasses.replace(base, lam=lam)
        params = init_params(20, 10, 10, np.random.default_rng(0), dtype=np.float64)
        params, _ = train(params, tiny_data, config, np.random.default_rng(0))
        return float(np.sum(params["W1"] ** 2) + np.sum(params["W2"] ** 2))

    norms = [weight_norm(lam) for lam in (0.0, 0.01, 0.1, 1.0)]
    # same init and batches: the only change is λ, and ‖W‖² falls strictly as λ grows
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.5 * norms[0], norms  # and by a clear margin, not by noise


# ---- issue 15: the gradient check on data whose leading dimensions are constant ----------------

@pytest.mark.parametrize("border", [0, 128])
def test_gradient_check_passes_on_data_with_a_constant_border(border):
    # a data set in this format whose first 100 dimensions are constant (a uniform border): they
    # normalise to 0, and a slice of them put every hidden unit on the ReLU's kink (error 1.0)
    r = np.random.default_rng(5)
    X = r.integers(0, 256, size=(120, 3072), dtype=np.uint8)
    X[:, :100] = border
    y = r.integers(0, 10, size=120)
    data = split_and_normalise(X, y, X[:10], y[:10], 20, np.float32, "border")
    assert not data.train.X[:, :100].any()
    report = gradcheck_report(data.train.X, data.train.y, np.random.default_rng(0))
    worst = max(e for c in report["checks"] for e in c["max_rel_error"].values())
    assert report["passed"] and worst < 1e-7, report


def test_informative_dims_are_the_varying_ones():
    rows = np.zeros((5, 30))
    rows[:, [3, 17, 29]] = np.arange(15).reshape(5, 3) * [1, 3, 2]
    assert informative_dims(rows, 2).tolist() == [17, 29]
    assert informative_dims(np.ones((5, 30)), 3).tolist() == [0, 1, 2]  # ties: the first ones


def test_entries_where_both_gradients_are_negligible_pass():
    analytic, numeric = np.array([0.0, 0.5, -2e-3]), np.array([1e-13, 0.5, -2e-3])
    assert relative_error(analytic, numeric) == 0.0
    # a real mismatch still counts, however small the gradients of the other entries
    assert relative_error(np.array([0.0, 1e-3]), np.array([1e-13, 2e-3])) == pytest.approx(1 / 3)
    assert relative_error(np.array([0.0]), np.array([1e-6])) == 1.0  # not negligible: a wrong 0

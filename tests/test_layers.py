"""Each layer's backward against centred differences of sum(out · dout) with a random dout."""
import numpy as np
import pytest

from clr_lambda_search.model.layers import (affine_backward, affine_forward, relu_backward, relu_forward, softmax,
                          softmax_cross_entropy)
from clr_lambda_search.model.gradcheck import relative_error

H = 1e-5
# Centred differences of a function that is linear (affine) or piecewise linear away from its kinks
# (ReLU) are exact up to float64 round-off, so 1e-8 leaves a wide margin above ~1e-10 noise.
LAYER_TOL = 1e-8


def numerical_grad_array(f, x, h=H):
    """Centred differences (f(x + h) − f(x − h)) / 2h of the scalar f() for every entry of x."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        f_plus = f()
        x[i] = old - h
        f_minus = f()
        x[i] = old
        g[i] = (f_plus - f_minus) / (2 * h)
    return g


def test_affine_backward_matches_centred_differences(rng):
    X, W, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)
    dout = rng.standard_normal((4, 3))
    out, cache = affine_forward(X, W, b)
    dX, dW, db = affine_backward(dout, cache)

    def f():
        return float(np.sum(affine_forward(X, W, b)[0] * dout))

    # shapes follow the inputs; the values are the true gradients of sum(out · dout)
    assert out.shape == (4, 3)
    assert (dX.shape, dW.shape, db.shape) == (X.shape, W.shape, b.shape)
    assert relative_error(dX, numerical_grad_array(f, X)) < LAYER_TOL
    assert relative_error(dW, numerical_grad_array(f, W)) < LAYER_TOL
    assert relative_error(db, numerical_grad_array(f, b)) < LAYER_TOL


def test_affine_forward_value(rng):
    X, W, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)
    # forward is X W + b, samples in rows
    np.testing.assert_allclose(affine_forward(X, W, b)[0], X @ W + b, rtol=1e-14, atol=1e-14)


def test_relu_backward_matches_centred_differences(rng):
    x = rng.standard_normal((6, 7))
    x += np.where(x >= 0, 1e-3, -1e-3)  # keep every entry ≥ 1e-3 away from the kink at 0 (≫ H)
    dout = rng.standard_normal(x.shape)
    out, cache = relu_forward(x)
    dx = relu_backward(dout, cache)

    def f():
        return float(np.sum(relu_forward(x)[0] * dout))

    assert relative_error(dx, numerical_grad_array(f, x)) < LAYER_TOL
    # the gradient is exactly dout where x > 0 and exactly 0 elsewhere
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0.0))
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def test_relu_gradient_at_zero_is_zero():
    # the subgradient convention at the kink is 0, as in the fused step (dH *= H > 0)
    x = np.array([[-1.0, 0.0, 2.0]])
    dx = relu_backward(np.ones_like(x), relu_forward(x)[1])
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 1.0]])


def test_softmax_cross_entropy_gradient_matches_centred_differences(rng):
    scores, y = rng.standard_normal((5, 10)), rng.integers(0, 10, 5)
    _, dscores = softmax_cross_entropy(scores, y)
    num = numerical_grad_array(lambda: softmax_cross_entropy(scores, y)[0], scores)
    # smooth function: centred differences have O(h²) ≈ 1e-10 truncation error
    assert relative_error(dscores, num) < 1e-7


def test_softmax_cross_entropy_equals_direct_computation(rng):
    N, K = 6, 10
    scores, y = rng.standard_normal((N, K)) * 3, rng.integers(0, K, N)
    loss, dscores = softmax_cross_entropy(scores, y)
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)  # naive, fine at this scale
    expected_loss = -np.mean(np.log(p[np.arange(N), y]))
    onehot = np.eye(K)[y]
    # mean (not sum) over N of −log p_y, and dscores = (P − Y) / N
    assert np.ndim(loss) == 0  # a scalar
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(dscores, (p - onehot) / N, rtol=1e-10, atol=1e-15)


def test_softmax_cross_entropy_is_stable_with_huge_scores():
    # exp(1e4) overflows float64: only a max-shifted softmax stays finite here
    scores = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4], [-1e4, 1e4, 0.0]])
    y = np.array([0, 1, 0])
    # no overflow, 0·inf or log(0) anywhere, not just a finite end (underflow to 0 is harmless)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, dscores = softmax_cross_entropy(scores, y)
    # row 0: p_y = 1 -> 0; row 1: three equal scores -> ln 3; row 2: score gap 2e4 -> 2e4
    assert loss == pytest.approx((0.0 + np.log(3) + 2e4) / 3, rel=1e-12)
    assert np.isfinite(dscores).all()
    np.testing.assert_allclose(dscores.sum(axis=1), 0.0, atol=1e-15)  # P rows sum to 1, Y rows to 1


def test_softmax_is_stable_and_normalised_with_huge_scores():
    scores = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4]])
    with np.errstate(over="raise", invalid="raise"):
        p = softmax(scores)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(p, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-15)

"""The two-layer network: d → m ReLU → K softmax, with L2 cost λ(‖W1‖² + ‖W2‖²).

L2 convention (the DD2424 one, which the best λ depends on): cost = loss + λ·Σ W², biases are not
regularised, so the weight gradient gains 2λW. `loss` is the mean cross-entropy (data term).
"""
import numpy as np

from clr_lambda_search.model.layers import (affine_backward, affine_forward, relu_backward, relu_forward,
                          softmax_cross_entropy)

PARAM_KEYS = ("W1", "b1", "W2", "b2")
WEIGHT_KEYS = ("W1", "W2")


def init_params(D, m, K, rng, dtype=np.float32):
    """W1 ~ N(0, 1/√D) (D, m), W2 ~ N(0, 1/√m) (m, K), zero biases, drawn from rng."""
    return {
        "W1": (rng.standard_normal((D, m)) / np.sqrt(D)).astype(dtype),
        "b1": np.zeros(m, dtype=dtype),
        "W2": (rng.standard_normal((m, K)) / np.sqrt(m)).astype(dtype),
        "b2": np.zeros(K, dtype=dtype),
    }


def l2_penalty(params, lam):
    """λ(‖W1‖² + ‖W2‖²), summed in at least float64 (in the weights' dtype if wider)."""
    acc = np.result_type(params["W1"].dtype, np.float64)
    return lam * sum(np.sum(np.square(params[k], dtype=acc)) for k in WEIGHT_KEYS)


def scores(params, X):
    """Class scores (N, K) of X (N, D)."""
    H = np.maximum(X @ params["W1"] + params["b1"], 0)
    return H @ params["W2"] + params["b2"]


def loss_and_grads(params, X, y, lam, mask=None):
    """Reference forward and backward pass on X (N, D), y (N,).

    mask: None, or inverted dropout's fixed mask (N, m) on the hidden layer (layers.dropout_mask:
      0 for a dropped unit, 1/(1 − p) for a kept one); the hidden activations are multiplied by it.
    Returns (cost, loss, grads) with grads keyed like params. Training uses the fused step of
    model.step; this composition of layers is what the gradient check and the tests trust.
    """
    a1, c1 = affine_forward(X, params["W1"], params["b1"])
    h, c_relu = relu_forward(a1)
    if mask is not None:
        h = h * mask
    s, c2 = affine_forward(h, params["W2"], params["b2"])
    loss, ds = softmax_cross_entropy(s, y)
    dh, dW2, db2 = affine_backward(ds, c2)
    if mask is not None:
        dh = dh * mask  # the mask is a constant factor of h: the same factor on its gradient
    _, dW1, db1 = affine_backward(relu_backward(dh, c_relu), c1)
    grads = {"W1": dW1 + 2 * lam * params["W1"], "b1": db1,
             "W2": dW2 + 2 * lam * params["W2"], "b2": db2}
    return loss + l2_penalty(params, lam), loss, grads

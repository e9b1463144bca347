"""Layer forward/backward pairs. Samples are rows: X is (N, D)."""
import numpy as np


def affine_forward(X, W, b):
    """X (N, D), W (D, M), b (M,) -> out (N, M), cache."""
    return X @ W + b, (X, W)


def affine_backward(dout, cache):
    """dout (N, M) -> dX (N, D), dW (D, M), db (M,)."""
    X, W = cache
    return dout @ W.T, X.T @ dout, dout.sum(axis=0)


def relu_forward(x):
    """Elementwise max(0, x) -> out, cache."""
    return np.maximum(x, 0), x


def relu_backward(dout, cache):
    """Pass the gradient where the input was positive."""
    return dout * (cache > 0)


def dropout_mask(uniform, p):
    """Inverted dropout's mask from uniform draws in [0, 1): 0 where a draw is below p (the unit is
    dropped, with probability p), else 1/(1 − p), so that the layer's expected output is unchanged
    and evaluation needs no mask. The training step draws and compares the same way."""
    return np.where(uniform >= p, 1.0 / (1.0 - p), 0.0)


def softmax(scores):
    """Row-wise softmax of scores (N, K), shifted by the row max so exp never overflows."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(scores, y):
    """Mean cross-entropy of scores (N, K) against labels y (N,) -> (loss, dscores (N, K))."""
    N = scores.shape[0]
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(N), y].mean()  # a scalar of the scores' dtype: no precision lost
    dscores = np.exp(log_probs)
    dscores[np.arange(N), y] -= 1
    return loss, dscores / N

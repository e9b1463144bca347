"""The triangular cyclical learning rate (Smith 2015) and the step size n_s of the protocol."""


def cyclic_lr(t, eta_min, eta_max, n_s):
    """η at update step t of a triangular cycle of length 2·n_s.

    Rises linearly from eta_min (t = 0) to eta_max (t = n_s), falls back to eta_min (t = 2·n_s),
    and repeats.
    """
    assert n_s > 0 and t >= 0, "n_s must be positive and t non-negative"
    # 1) position inside the current cycle
    pos = t % (2 * n_s)
    # 2) rising half: eta_min -> eta_max
    if pos <= n_s:
        return eta_min + (eta_max - eta_min) * pos / n_s
    # 3) falling half: eta_max -> eta_min
    return eta_max - (eta_max - eta_min) * (pos - n_s) / n_s


def step_size(n_train, n_batch, k=2):
    """n_s = k·⌊n_train / n_batch⌋: k epochs per half cycle (the report's final run: 2·490 = 980)."""
    return k * (n_train // n_batch)

"""The triangular cyclical learning rate and the protocol's step size n_s."""
import pytest

from clr_lambda_search.model.schedule import cyclic_lr, step_size

ETA_MIN, ETA_MAX, N_S = 1e-5, 1e-1, 980
MID = (ETA_MIN + ETA_MAX) / 2


@pytest.mark.parametrize("t, expected", [
    (0, ETA_MIN),               # a cycle starts at the bottom
    (N_S // 2, MID),            # halfway up
    (N_S, ETA_MAX),             # the peak at n_s
    (3 * N_S // 2, MID),        # halfway down
    (2 * N_S, ETA_MIN),         # back at the bottom at the end of the cycle
])
def test_cyclic_lr_known_points(t, expected):
    assert cyclic_lr(t, ETA_MIN, ETA_MAX, N_S) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cyclic_lr_is_periodic_with_period_2_n_s():
    for t in range(0, 2 * N_S + 1):
        # cycles 2 and 3 repeat cycle 1 step for step
        for k in (1, 2):
            assert cyclic_lr(t + 2 * k * N_S, ETA_MIN, ETA_MAX, N_S) == pytest.approx(
                cyclic_lr(t, ETA_MIN, ETA_MAX, N_S), rel=1e-12, abs=1e-15)


def test_cyclic_lr_is_a_triangle():
    n_s = 7
    up = [cyclic_lr(t, ETA_MIN, ETA_MAX, n_s) for t in range(0, n_s + 1)]
    down = [cyclic_lr(t, ETA_MIN, ETA_MAX, n_s) for t in range(n_s, 2 * n_s + 1)]
    step = (ETA_MAX - ETA_MIN) / n_s
    # linear rise and fall by (η_max − η_min)/n_s per update, always inside [η_min, η_max]
    for a, b in zip(up, up[1:]):
        assert b - a == pytest.approx(step, rel=1e-9)
    for a, b in zip(down, down[1:]):
        assert a - b == pytest.approx(step, rel=1e-9)
    assert all(ETA_MIN - 1e-15 <= e <= ETA_MAX + 1e-15 for e in up + down)


def test_cyclic_lr_rejects_bad_arguments():
    with pytest.raises(AssertionError):
        cyclic_lr(0, ETA_MIN, ETA_MAX, 0)
    with pytest.raises(AssertionError):
        cyclic_lr(-1, ETA_MIN, ETA_MAX, N_S)


def test_step_size():
    assert step_size(49000, 100) == 980       # the report's final run: 2·⌊49000/100⌋
    assert step_size(49050, 100) == 980       # floor, not round
    assert step_size(49000, 100, k=5) == 2450

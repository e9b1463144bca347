"""TrainConfig validation, the training loop's bookkeeping, determinism, divergence and on_eval."""
import dataclasses

import numpy as np
import pytest

from clr_lambda_search.model import train as train_module
from clr_lambda_search.model.errors import ConfigError, DivergedError
from clr_lambda_search.model.network import init_params, loss_and_grads
from clr_lambda_search.model.schedule import cyclic_lr
from clr_lambda_search.model.train import TrainConfig, evaluate, fit, train

# tiny_data has 53 training samples: with n_batch 10 an epoch is 5 full batches + 1 of 3.
N_TRAIN, N_BATCH = 53, 10
BATCHES_PER_EPOCH = 6


def tiny_config(**kw):
    base = dict(lam=0.01, m=10, n_batch=N_BATCH, eta_min=1e-4, eta_max=0.05, n_s=7, cycles=1,
                evals_per_cycle=2, eval_train_samples=0, seed=0, dtype="float64")
    return TrainConfig(**{**base, **kw})


def run(data, config, seed=0, on_eval=None):
    return fit(data, dataclasses.replace(config, seed=seed), on_eval=on_eval)


# ---- TrainConfig --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"lam": -1e-3}, {"lam": float("nan")}, {"lam": float("inf")},
    {"n_s": 0}, {"n_s": -5}, {"cycles": 0}, {"cycles": -1},
    {"eta_min": 0.2, "eta_max": 0.1}, {"eta_min": 0.0}, {"eta_min": -1e-5},
    {"dtype": "float16"}, {"dtype": "int32"},
    {"m": 0}, {"n_batch": 0}, {"evals_per_cycle": 0}, {"eval_train_samples": -1},
    # issue 15: more evaluation points than updates (300M of them spun in eval_steps), and seeds
    # outside 32 bits (Optuna's samplers refuse them, after the study was written)
    {"n_s": 5, "evals_per_cycle": 11}, {"evals_per_cycle": 300_000_000},
    {"seed": -1}, {"seed": 2**32},
    # counts are whole numbers: a search that drew 77.2 hidden units must not train
    {"m": 77.2}, {"m": 50.0}, {"n_batch": 99.5}, {"n_s": 800.5}, {"cycles": 2.5}, {"m": True},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**bad)
    # the message names the offending field, so a user knows what to fix
    assert any(name in str(e.value) for name in bad)


def test_config_defaults_are_the_report_protocol():
    c = TrainConfig()
    assert (c.m, c.n_batch, c.eta_min, c.eta_max, c.n_s, c.cycles) == (50, 100, 1e-5, 1e-1, 980, 3)
    assert c.total_steps == 5880  # 3 cycles of 2·980 = 12 epochs of 490 updates
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lam = 0.1  # variants go through dataclasses.replace, never mutation


def test_config_accepts_edge_values():
    TrainConfig(lam=0.0, eta_min=0.1, eta_max=0.1, eval_train_samples=0, dtype="float64")


@pytest.mark.parametrize("n_s, cycles, evals", [(980, 3, 10), (7, 1, 2), (5, 2, 3), (3, 1, 6)])
def test_total_steps_and_eval_steps(n_s, cycles, evals):
    c = TrainConfig(n_s=n_s, cycles=cycles, evals_per_cycle=evals)
    assert c.total_steps == 2 * n_s * cycles
    steps = c.eval_steps()
    assert steps[0] == 0 and steps[-1] == c.total_steps  # the start and the end are both evaluated
    assert steps == sorted(set(steps))  # sorted, no duplicates
    assert all(0 <= s <= c.total_steps for s in steps)
    # every cycle boundary is an evaluation point, and no more than evals per cycle (+ step 0)
    assert all(k * 2 * n_s in steps for k in range(cycles + 1))
    assert len(steps) <= cycles * evals + 1


def test_eval_steps_of_the_final_protocol():
    # 10 evenly spaced points per 1960-update cycle
    assert TrainConfig().eval_steps() == list(range(0, 5881, 196))


# ---- the loop ------------------------------------------------------------------------------------

@pytest.fixture
def recorded_steps(monkeypatch):
    """Wrap model.train.sgd_step (train imported it by name) and record every call's idx and η."""
    calls = []
    real = train_module.sgd_step

    def spy(params, X, y, idx, eta, lam, ws, pixels=None):
        calls.append((np.array(idx), eta))
        return real(params, X, y, idx, eta, lam, ws, pixels)

    monkeypatch.setattr(train_module, "sgd_step", spy)
    return calls


def test_train_takes_exactly_total_steps_and_uses_every_sample_once_per_epoch(tiny_data,
                                                                               recorded_steps):
    config = tiny_config(n_s=7, cycles=1)  # 14 updates = 2 full epochs + 2 batches of a third
    assert len(tiny_data.train.y) == N_TRAIN and N_TRAIN % N_BATCH != 0
    run(tiny_data, config)
    assert len(recorded_steps) == config.total_steps == 14
    for e in range(2):
        epoch = recorded_steps[e * BATCHES_PER_EPOCH:(e + 1) * BATCHES_PER_EPOCH]
        # 5 full batches and the last, smaller one: nothing dropped ...
        assert [len(idx) for idx, _ in epoch] == [10, 10, 10, 10, 10, 3]
        # ... and each of the 53 samples exactly once
        np.testing.assert_array_equal(np.sort(np.concatenate([idx for idx, _ in epoch])),
                                      np.arange(N_TRAIN))
    first, second = (np.concatenate([idx for idx, _ in recorded_steps[e * 6:(e + 1) * 6]])
                     for e in range(2))
    assert not np.array_equal(first, second)  # each epoch is reshuffled
    third = np.concatenate([idx for idx, _ in recorded_steps[12:]])
    assert len(third) == 20 and len(np.unique(third)) == 20  # the partial epoch repeats nothing
    # η follows the schedule at each update t = 0 .. total_steps − 1
    np.testing.assert_allclose([eta for _, eta in recorded_steps],
                               [cyclic_lr(t, config.eta_min, config.eta_max, config.n_s)
                                for t in range(14)], rtol=1e-15)


def test_train_equals_reference_steps_and_evaluates_the_true_weights(tiny_data, recorded_steps):
    """Replaying train()'s batches and η with network.loss_and_grads gives its params and, at
    every evaluation point, its metrics: W1's pending decay scale (model.step.StepParams) is applied
    before each evaluation and before train() returns. λ is large: between two evaluation points
    the pending scale falls to ~0.85, far from round-off."""
    config = tiny_config(lam=0.5, n_s=7, cycles=1, evals_per_cycle=2)
    params, history = run(tiny_data, config)
    ref = init_params(20, config.m, 10, np.random.default_rng(0), dtype=np.float64)
    X, y = tiny_data.train.X, tiny_data.train.y
    records = {r["step"]: r for r in history}
    for t, (idx, eta) in enumerate(recorded_steps, start=1):
        _, _, grads = loss_and_grads(ref, X[idx], y[idx], config.lam)
        ref = {k: ref[k] - eta * grads[k] for k in ref}
        if t in records:
            expected = evaluate(ref, tiny_data.val.X, tiny_data.val.y, config.lam)
            for key in ("loss", "cost", "acc"):
                assert records[t]["val"][key] == pytest.approx(expected[key], rel=1e-9), (t, key)
    assert set(records) == {0, 7, 14}
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_train_stops_at_an_epoch_boundary_too(tiny_data, recorded_steps):
    config = tiny_config(n_s=6, cycles=1)  # 12 updates = exactly 2 epochs
    run(tiny_data, config)
    assert len(recorded_steps) == 12


def test_history_records(tiny_data):
    config = tiny_config(n_s=7, cycles=2, evals_per_cycle=3)
    params, history = run(tiny_data, config)
    # one record per evaluation point, with the η of that step and finite metrics on both splits
    assert [r["step"] for r in history] == config.eval_steps()
    for r in history:
        assert r["lr"] == pytest.approx(cyclic_lr(r["step"], config.eta_min, config.eta_max, 7))
        for split in ("train", "val"):
            assert set(r[split]) == {"loss", "cost", "acc"}
            assert np.isfinite(r[split]["loss"]) and 0 <= r[split]["acc"] <= 1
    # 28 updates = 4 epochs of 6 batches + 4 batches of the 5th epoch
    assert history[0]["epoch"] == 0 and history[-1]["epoch"] == 5
    final = evaluate(params, tiny_data.val.X, tiny_data.val.y, config.lam)
    assert history[-1]["val"] == final  # the last record describes the returned params


def test_without_train_curve_the_train_subset_is_measured_at_the_end_only(tiny_data):
    """train_curve=False (a final seed whose curves are not drawn): "train" is None at every point
    but the last, val is everywhere, and training and the last record are those of a full run."""
    config = tiny_config(cycles=2)
    full = fit(tiny_data, config)
    params, history = fit(tiny_data, config, train_curve=False)
    assert len(history) == len(full[1]) == len(config.eval_steps())
    assert [r["train"] is None for r in history] == [True] * (len(history) - 1) + [False]
    assert [r["val"] for r in history] == [r["val"] for r in full[1]]
    assert history[-1] == full[1][-1]
    for k in params:
        np.testing.assert_array_equal(params[k], full[0][k], err_msg=k)


def test_eval_train_samples_uses_a_prefix(tiny_data):
    config = tiny_config(eval_train_samples=15)
    params, history = run(tiny_data, config)
    expected = evaluate(params, tiny_data.train.X[:15], tiny_data.train.y[:15], config.lam)
    assert history[-1]["train"] == expected


def test_evaluate_matches_the_reference_loss(tiny_data, tiny_params):
    X, y, lam = tiny_data.train.X, tiny_data.train.y, 0.2
    cost, loss, _ = loss_and_grads(tiny_params, X, y, lam)
    hidden = np.maximum(X @ tiny_params["W1"] + tiny_params["b1"], 0)
    acc = float(np.mean((hidden @ tiny_params["W2"] + tiny_params["b2"]).argmax(axis=1) == y))
    for block in (8192, 7):  # blocking over rows changes nothing
        got = evaluate(tiny_params, X, y, lam, block=block)
        assert got["loss"] == pytest.approx(loss, rel=1e-12)
        assert got["cost"] == pytest.approx(cost, rel=1e-12)
        assert got["acc"] == acc


def test_same_seed_is_bit_identical_and_different_seed_differs(tiny_data):
    config = tiny_config(n_s=7, cycles=1)
    p1, h1 = run(tiny_data, config, seed=3)
    p2, h2 = run(tiny_data, config, seed=3)
    p3, h3 = run(tiny_data, config, seed=4)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])  # bit-identical, not merely close
    assert h1 == h2
    assert not np.array_equal(p1["W1"], p3["W1"])
    assert h1 != h3


def test_float32_training_stays_float32(tiny_data):
    from clr_lambda_search.model.dataset import Dataset, Split
    f32 = Dataset(*(Split(s.X.astype(np.float32), s.y) for s in (tiny_data.train, tiny_data.val,
                                                                 tiny_data.test)), source="s")
    params, history = run(f32, tiny_config(dtype="float32"))
    assert all(v.dtype == np.float32 for v in params.values())
    assert np.isfinite(history[-1]["train"]["loss"])


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")
def test_huge_eta_max_raises_diverged(tiny_data):
    config = tiny_config(lam=10.0, eta_max=1e4, n_s=50, cycles=1)
    with pytest.raises(DivergedError) as e:
        run(tiny_data, config)
    # the message says what happened and with which settings
    assert "diverged" in str(e.value)
    assert "λ=10" in str(e.value) and "η_max=10000" in str(e.value)


def test_on_eval_is_called_at_every_eval_step(tiny_data):
    config = tiny_config(n_s=7, cycles=2, evals_per_cycle=3)
    seen = []
    _, history = run(tiny_data, config, on_eval=seen.append)
    assert [r["step"] for r in seen] == config.eval_steps()
    assert seen == history  # the callback sees exactly the recorded history


class Stop(Exception):
    pass


def test_an_exception_in_on_eval_stops_training(tiny_data, recorded_steps):
    config = tiny_config(n_s=7, cycles=2, evals_per_cycle=3)
    stop_at = config.eval_steps()[2]
    seen = []

    def on_eval(record):
        seen.append(record["step"])
        if record["step"] == stop_at:
            raise Stop()

    with pytest.raises(Stop):
        run(tiny_data, config, on_eval=on_eval)
    # no update after the step whose evaluation raised, and no further callbacks
    assert len(recorded_steps) == stop_at < config.total_steps
    assert seen == config.eval_steps()[:3]


def test_train_updates_params_in_place(tiny_data):
    config = tiny_config()
    params = init_params(20, config.m, 10, np.random.default_rng(0), dtype=np.float64)
    before = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    out, _ = train(params, tiny_data, config, np.random.default_rng(0))
    assert out is params and {k: id(v) for k, v in out.items()} == ids
    assert all(not np.array_equal(before[k], out[k]) for k in before)


def test_training_from_pixels_equals_training_from_X(cifar_tiny_dir, tmp_path):
    """train() gathers batches from the train split's pixels when it has them: the very same
    run, bit for bit, as gathering the normalised rows of X."""
    from clr_lambda_search.model.dataset import load_cifar10

    data = load_cifar10(cifar_tiny_dir.batches, n_val=20, cache_dir=tmp_path)
    assert data.train.pixels is not None
    without = dataclasses.replace(data, train=dataclasses.replace(data.train, pixels=None))
    config = TrainConfig(m=8, n_batch=10, n_s=6, cycles=1, evals_per_cycle=2, lam=0.01)
    (p1, h1), (p2, h2) = fit(data, config), fit(without, config)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
    assert h1 == h2


def test_warm_up_compiles_without_touching_the_data(tiny_data):
    """warm_up trains a throwaway step (so forked workers inherit compiled kernels): the data
    stay as they were, and a real run afterwards is the run it would have been."""
    from clr_lambda_search.model.train import warm_up

    config = tiny_config(n_s=5, cycles=1)
    before = fit(tiny_data, config)
    X = tiny_data.train.X.copy()
    warm_up(tiny_data, config)
    np.testing.assert_array_equal(tiny_data.train.X, X)
    after = fit(tiny_data, config)
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k], err_msg=k)


def test_curves_skip_the_points_where_train_was_not_measured(tiny_data):
    """A history without a train curve draws train at its last point only, val at every point."""
    from clr_lambda_search.model.curves import curve, metric_figure

    config = tiny_config(cycles=2)
    _, history = fit(tiny_data, config, train_curve=False)
    steps, values = curve(history, "train", "acc")
    assert steps == [config.total_steps] and values == [history[-1]["train"]["acc"]]
    assert curve(history, "val", "loss")[0] == config.eval_steps()
    lines = {line.get_label(): line for line in metric_figure(history, "acc").axes[0].lines}
    assert list(lines["train"].get_xdata()) == [config.total_steps]
    assert list(lines["validation"].get_ydata()) == [r["val"]["acc"] for r in history]


def test_the_figures_say_what_they_show():
    from clr_lambda_search.model.curves import training_figures

    history = [{"step": s, "train": {"acc": 0.1, "loss": 2.0, "cost": 2.1},
                "val": {"acc": 0.1, "loss": 2.0, "cost": 2.1}} for s in (0, 10, 20)]
    config = TrainConfig(n_s=5, cycles=2, eval_train_samples=1000)
    figs = training_figures(history, config)
    ax = figs["accuracy"].axes[0]
    assert ax.get_ylabel() == "accuracy" and ax.get_xlabel() == "update step"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train (1,000-image subset)", "validation"]
    assert figs["lr"].axes[0].get_ylabel() == "learning rate η"
    # the η figure is drawn through the triangle's corners, not one point per update
    assert list(figs["lr"].axes[0].lines[0].get_xdata()) == [0, 5, 10, 15, 20]

"""fit(checkpoint=...): a run killed after a cycle end resumes from there, bit-identical."""
import dataclasses
import hashlib
import logging

import numpy as np
import pytest

from conftest import pixel_data
from clr_lambda_search.model.network import PARAM_KEYS
from clr_lambda_search.model.precision import bf16_missing
from clr_lambda_search.model.train import TrainConfig, fit

# n_s = 37 with 300 images in batches of 50: cycle ends (74, 148) fall mid-epoch (6 batches
# per epoch), so a resume must restore the epoch's permutation and its place in it
CONFIG = TrainConfig(lam=1e-3, m=16, n_batch=50, eta_max=0.05, n_s=37, cycles=3,
                     evals_per_cycle=3, eval_train_samples=0, dropout=0.3, flip=True, shift=2)


class Killed(Exception):
    """What the test raises from on_eval to stop a run, as a SIGTERM would."""


def digest(params):
    h = hashlib.sha256()
    for k in PARAM_KEYS:
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


def kill_at(step):
    """An on_eval that stops the run at its first evaluation point at or after step."""
    def on_eval(record):
        if record["step"] >= step:
            raise Killed
    return on_eval


@pytest.mark.parametrize("precision", [
    "fp32", pytest.param("bf16", marks=pytest.mark.skipif(
        bf16_missing() is not None, reason=f"bf16 cannot run here: {bf16_missing()}"))])
def test_a_run_interrupted_after_a_cycle_resumes_bit_identical(tmp_path, precision):
    data = pixel_data("float32")
    config = dataclasses.replace(CONFIG, precision=precision)
    straight, history, snaps = fit(data, config, snapshots=True)
    path = tmp_path / "seed0.npz"
    with pytest.raises(Killed):  # killed after the first cycle's end (step 74), mid-cycle two
        fit(data, config, on_eval=kill_at(100), snapshots=True, checkpoint=path)
    assert path.is_file()
    resumed, history2, snaps2 = fit(data, config, snapshots=True, checkpoint=path)
    assert digest(resumed) == digest(straight)
    assert history2 == history  # the records before the kill came from the checkpoint
    assert [digest(s) for s in snaps2] == [digest(s) for s in snaps]


def test_a_resumed_run_skips_the_cycles_it_had(tmp_path):
    """Resumed at step 148 of 222, the run evaluates only the points after it."""
    data = pixel_data("float32")
    path = tmp_path / "state.npz"
    with pytest.raises(Killed):
        fit(data, CONFIG, on_eval=kill_at(160), checkpoint=path)
    seen = []
    fit(data, CONFIG, on_eval=lambda r: seen.append(r["step"]), checkpoint=path)
    assert seen == [s for s in CONFIG.eval_steps() if s > 148]


def test_a_checkpoint_of_another_run_is_ignored_and_overwritten(tmp_path, caplog):
    data = pixel_data("float32")
    path = tmp_path / "state.npz"
    with pytest.raises(Killed):
        fit(data, CONFIG, on_eval=kill_at(100), checkpoint=path)
    other = dataclasses.replace(CONFIG, lam=2e-3)
    with caplog.at_level(logging.INFO, logger="clr_lambda_search.model.train"):
        params, _ = fit(data, other, checkpoint=path)
    assert "of another run" in caplog.text
    assert digest(params) == digest(fit(data, other)[0])  # trained from scratch
    with caplog.at_level(logging.INFO, logger="clr_lambda_search.model.train"):
        again, _ = fit(data, other, checkpoint=path)  # the state is now the other run's end
    assert "resuming" in caplog.text and digest(again) == digest(params)


def test_a_damaged_checkpoint_is_a_fresh_start(tmp_path, caplog):
    data = pixel_data("float32")
    path = tmp_path / "state.npz"
    path.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="clr_lambda_search.model.train"):
        params, _ = fit(data, CONFIG, checkpoint=path)
    assert "unreadable" in caplog.text
    assert digest(params) == digest(fit(data, CONFIG)[0])

"""Study identity: a study of the same name made by another program, or trials scored on other
data, are never adopted and ranked with a phase's own trials."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from clr_lambda_search.model.dataset import Split
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.train import TrainConfig
from clr_lambda_search.search import record
from clr_lambda_search.search.campaign import Campaign, with_phase
from clr_lambda_search.search.core import run_phase
from clr_lambda_search.search.phases import SearchPhase
from clr_lambda_search.search.space import Float
from clr_lambda_search.search.study import open_storage
from test_cli_errors import diff, script_env, snapshot

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(m=10, n_batch=10, n_s=5, cycles=1, evals_per_cycle=2, eval_train_samples=0,
                   dtype="float64")
SPEC = Campaign(name="c", phases=(SearchPhase(name="coarse", n_trials=2, pruner="none",
                                              space=(Float("lam", 1e-4, 1.0, log=True),)),),
                config=tuple(vars(TINY).items()))


def run_spec(campaign, storage, data):
    """Run (or resume) the one phase (coarse) of campaign; the study."""
    return run_phase(campaign, "coarse", data, storage)[0]


def with_trials(n):
    return with_phase(SPEC, "coarse", n_trials=n)


@pytest.mark.parametrize("kind", ["minimize", "two-objectives", "foreign-trials"])
def test_a_study_made_by_another_program_is_refused(cifar_tiny_dir, tmp_path, kind):
    db = tmp_path / "s.db"
    storage = open_storage(f"sqlite:///{db}")
    if kind == "minimize":
        optuna.create_study(study_name="c-coarse", storage=storage, direction="minimize")
    elif kind == "two-objectives":
        optuna.create_study(study_name="c-coarse", storage=storage,
                            directions=["maximize", "maximize"])
    else:  # maximised, but its trials were not written by this project
        study = optuna.create_study(study_name="c-coarse", storage=storage, direction="maximize")
        study.optimize(lambda t: t.suggest_float("lam", 0.1, 1.0), n_trials=2)
    storage.engine.dispose()
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "search.py"), "coarse", "--campaign", "c",
         "--storage", f"sqlite:///{db}", "--data-dir", str(cifar_tiny_dir.batches), "--n-val",
         "20", "--n-s", "5", "--cycles", "1", "--n-batch", "20", "--n-trials", "1", "--pruner",
         "none", "-q"], cwd=REPO, env=script_env(tmp_path / "_cache"), capture_output=True,
        text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1 and "c-coarse" in proc.stderr, proc.stderr
    after = snapshot(tmp_path)
    changes = diff({k: v for k, v in before.items() if not k.startswith("_cache")},
                   {k: v for k, v in after.items() if not k.startswith("_cache")})
    assert changes == {"created": [], "deleted": [], "changed": []}, changes


def other_data(data):
    """The same data with one validation label changed: another validation set."""
    y = data.val.y.copy()
    y[0] = (y[0] + 1) % 10
    return dataclasses.replace(data, val=Split(data.val.X, y))


def test_resuming_on_other_data_is_refused(tmp_path, tiny_data):
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_spec(SPEC, open_storage(url), tiny_data)
    more = with_trials(3)
    with pytest.raises(InputError, match="other data"):
        run_spec(more, open_storage(url), other_data(tiny_data))
    study = run_spec(more, open_storage(url), tiny_data)  # the same data: resumed
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3


def test_a_study_written_before_fingerprints_is_adopted_once(tmp_path, tiny_data):
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_spec(SPEC, open_storage(url), tiny_data)
    storage = open_storage(url)
    from optuna.storages._rdb import models  # no public API deletes a user attr

    # what an earlier release recorded: no fingerprint at all

    session = storage.scoped_session()
    session.query(models.StudyUserAttributeModel).filter_by(key="data_fingerprint").delete()
    session.query(models.StudySystemAttributeModel).filter_by(
        key=record.PREFIX + "data_fingerprint").delete()
    session.commit()
    storage.scoped_session.remove()
    resumed = run_spec(with_trials(3), open_storage(url), tiny_data)
    assert len(record.read(resumed).fingerprint) == 64  # it got one
    with pytest.raises(InputError, match="other data"):
        run_spec(with_trials(4), open_storage(url), other_data(tiny_data))


def test_the_fingerprint_is_not_the_path(cifar_tiny_dir, tmp_path):
    import shutil

    from clr_lambda_search.model.dataset import fingerprint, load_cifar10

    copy = tmp_path / "copy" / "cifar-10-batches-py"
    shutil.copytree(cifar_tiny_dir.batches, copy)
    a = load_cifar10(cifar_tiny_dir.batches, n_val=20, cache_dir=tmp_path / "c1")
    b = load_cifar10(copy, n_val=20, cache_dir=tmp_path / "c2")
    c = load_cifar10(copy, n_val=21, cache_dir=tmp_path / "c2")
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert isinstance(json.loads(json.dumps(fingerprint(a))), str)  # as a study records it

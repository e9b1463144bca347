"""search.record: a study of record_version 3 lists on one short row (`optuna studies`), its
large fields in system attrs; a study of an earlier release keeps its record in its user attrs."""
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from clr_lambda_search.search import record
from clr_lambda_search.search.study import open_storage

CONFIG = {"m": 512, "n_batch": 100, "eta_min": 1e-05, "eta_max": 0.1, "n_s": 980, "cycles": 2,
          "evals_per_cycle": 1, "eval_train_samples": 1000, "seed": 0, "dtype": "float32",
          "dropout": 0.3, "flip": True, "shift": 2, "precision": "fp32"}
SPACE = [{"name": n, "low": 1e-5, "high": 1e-1, "log": True} for n in ("lam", "eta_max")]
CANDIDATES = [{"params": {"lam": 10 ** -k, "eta_max": 0.05}, "study": "extended-fine",
               "trial": k, "val_acc": 0.55} for k in range(3, 6)]


def full_record(name):
    return record.StudyRecord(
        campaign="extended", phase=name, kind="confirm", index=2, config=CONFIG, space=SPACE,
        sampler={"name": "TPESampler", "multivariate": True}, pruner="none", repeats=1, seed=0,
        n_trials=15, digest="e1608db499c7", fingerprint="43b5" * 16, precision="fp32",
        candidates=CANDIDATES, seeds=[1000, 1001, 1002, 1003, 1004],
        derived_from=[["extended-fine", k] for k in range(3)])


@pytest.fixture
def storage(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_storage(f"sqlite:///{tmp_path / 's.db'}")


def test_a_new_study_keeps_its_large_fields_out_of_its_user_attrs(storage):
    study = optuna.create_study(study_name="extended-confirm", storage=storage)
    wanted = full_record("confirm")
    assert record.write_missing(study, wanted) == wanted  # read back whole
    record.update(study, verdict={"pick": 0, "sentence": "x" * 500})
    assert set(study.user_attrs) == {"campaign", "phase", "kind", "phase_index", "n_trials",
                                     "record_version"}
    assert study.user_attrs["record_version"] == 3
    frozen, = [s for s in storage.get_all_studies() if s.study_name == "extended-confirm"]
    assert record.read(frozen) == record.read(study)  # a FrozenStudy reads it too
    assert record.read(study).verdict["sentence"] == "x" * 500
    summary, = optuna.get_all_study_summaries(storage, include_best_trial=False)
    assert record.read(summary).is_phase and record.read(summary).kind == "confirm"


def test_optuna_studies_lists_a_study_on_a_short_row(storage, tmp_path):
    for phase in ("coarse", "fine", "confirm"):
        study = optuna.create_study(study_name=f"extended-{phase}", storage=storage)
        record.write_missing(study, full_record(phase))
    optuna_cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(optuna_cli), "studies", "--storage",
                           f"sqlite:///{tmp_path / 's.db'}"],
                          capture_output=True, text=True, check=True, timeout=60)
    rows = proc.stdout.strip().splitlines()
    assert len(rows) == 3 + 4  # header, rules and a row per study
    assert max(len(r) for r in rows) < 300, rows


def test_an_older_studys_record_stays_in_its_user_attrs(storage):
    """A study of an earlier release (its record in user attrs, no record_version) is upgraded
    to version 2 in place, and what is written to it later goes there too."""
    old = optuna.create_study(study_name="old-fine", storage=storage)
    old.set_user_attr("phase", "fine")
    old.set_user_attr("space", SPACE)
    rec = record.write_missing(old, full_record("fine"))
    assert rec.version == 2 and rec.space == SPACE and rec.config == CONFIG
    record.update(old, verdict={"pick": 1})
    assert old.user_attrs["verdict"] == {"pick": 1} and old.user_attrs["config"] == CONFIG
    assert old.user_attrs["record_version"] == 2

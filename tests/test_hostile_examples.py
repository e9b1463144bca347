"""The enumerated hostile examples of issue 21 (Reliability III), classes 3–9, grouped by class.

Each failed on main before its fix (1a7b7d3): a study written before the input was refused, a
traceback, a hang, another data set taken for the same one, a changed grid resumed, an unclear
message. Classes 1 and 2 (the read-only --serve, the final record) are in test_serve.py and
test_final.py; the passwords of class 8 in test_secrets.py; the generated cases in
test_hostile_generated.py. Everything here runs in-process on tiny data, in seconds.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from clr_lambda_search.model.checkpoint import load_json, load_params
from clr_lambda_search.model.dataset import load_cifar10
from clr_lambda_search.model.errors import ConfigError, DataError, InputError
from clr_lambda_search.model.train import SEED_LIMIT, TrainConfig
from clr_lambda_search.search import phases, record, settings
from clr_lambda_search.search.api import run_phase as api_run_phase
from clr_lambda_search.search.campaign import Campaign, load_campaign, parse_campaign
from clr_lambda_search.search.core import run_final, run_phase
from clr_lambda_search.search.final import read_final
from clr_lambda_search.search.phases import ConfirmPhase, SearchPhase
from clr_lambda_search.search.space import Float
from clr_lambda_search.search.study import open_storage

REPO = Path(__file__).resolve().parents[1]
TINY = {"m": 10, "n_batch": 10, "n_s": 5, "cycles": 1, "evals_per_cycle": 2,
        "eval_train_samples": 0, "dtype": "float64"}


def campaign_dict(phase=None, final=None, **top):
    """A one-phase campaign on tiny settings, as parse_campaign reads a file."""
    phase = {"name": "coarse", "n_trials": 2, "pruner": "none",
             "params": {"lam": {"low": 1e-4, "high": 1e-2, "log": True}}, **(phase or {})}
    return {"name": "hostile", "search": dict(TINY), "phases": [phase],
            "final": {"seeds": 1, "n_s": 5, "cycles": 1, **(final or {})}, **top}


def script(name, *args, cwd):
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---- 3. bad input checked only after something is written ----------------------------------------

@pytest.mark.parametrize("param", [
    {"lam": {"low": -1.0, "high": 1e-3}},
    {"n_batch": {"choices": [0, -5]}},
    {"dropout": {"low": 0.5, "high": 1.5}},
    {"eta_min": {"low": 1e-5, "high": 0.5}, "eta_max": {"low": 0.01, "high": 0.2}},  # a pair
])
def test_a_range_past_trainconfigs_limits_is_refused_by_the_schema(param):
    raw = campaign_dict({"params": param})
    raw["search"].pop("n_batch")
    with pytest.raises(ConfigError, match=r"phases\[0\]\.params: a trial could draw"):
        parse_campaign(raw)


def test_a_range_inside_the_limits_is_accepted():
    raw = campaign_dict({"params": {"dropout": {"low": 0.0, "high": 0.5},
                                    "n_batch": {"choices": [10, 20]}}})
    raw["search"].pop("n_batch")
    parse_campaign(raw)  # control: both ends are valid


def test_a_hidden_layer_too_large_for_memory_is_refused_before_any_study(tmp_path, cifar_tiny_dir):
    path = tmp_path / "c.toml"
    path.write_text('[search]\nn_s = 5\ncycles = 1\n[[phases]]\nname = "coarse"\nn_trials = 2\n'
                    'pruner = "none"\nparams.m = {low = 1000000000000, high = 2000000000000}\n')
    proc = script("search", "coarse", "--config", str(path), "--storage", "sqlite:///s.db",
                  "--data-dir", str(cifar_tiny_dir.batches), "--n-val", "20", cwd=tmp_path)
    assert "memory" in one_error_line(proc)
    assert not (tmp_path / "s.db").exists()  # refused before the storage was made


@pytest.mark.parametrize("key, spec, needle", [
    ("sampler", {"name": "TPESampler", "gamma": 1, "n_startup_trials": 0}, "TPESampler fails"),
    ("sampler", "BruteForceSampler", "BruteForceSampler fails"),
    ("pruner", {"name": "MarginMedianPruner", "margin": "x"}, "MarginMedianPruner fails"),
    ("pruner", {"name": "HyperbandPruner", "min_resource": "x"}, "HyperbandPruner fails"),
])
def test_a_sampler_or_pruner_that_breaks_when_used_is_refused_by_the_schema(key, spec, needle):
    raw = campaign_dict({key: spec, "n_trials": 10})
    with pytest.raises(ConfigError, match=rf"phases\[0\]\.{key}: {needle}"):
        parse_campaign(raw)


def test_working_samplers_and_pruners_pass_the_exercise():
    for phase in ({"sampler": "tpe", "pruner": "median"}, {"pruner": "hyperband"},
                  {"sampler": {"name": "TPESampler", "n_startup_trials": 2}, "n_trials": 8},
                  {"params": {"lam": {"values": [1e-3, 1e-2]}}}):
        parse_campaign(campaign_dict(phase))


def test_a_phase_is_exercised_once_per_process_and_a_changed_one_again(monkeypatch):
    """The exercise's outcome is remembered per (sampler, pruner, space, config, trials): the
    same campaign loaded again exercises nothing; a changed sampler kwarg (one that breaks) is
    exercised and refused, as is the same breaking phase again."""
    calls = []
    real = phases.exercise
    monkeypatch.setattr(phases, "exercise", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(phases, "_EXERCISED", set())
    good = campaign_dict({"sampler": {"name": "TPESampler", "n_startup_trials": 2}, "n_trials": 8})
    parse_campaign(good)
    first = len(calls)
    assert first >= 1
    parse_campaign(good)
    assert len(calls) == first  # remembered
    bad = campaign_dict({"sampler": {"name": "TPESampler", "gamma": 1, "n_startup_trials": 0},
                         "n_trials": 8})
    for _ in range(2):
        with pytest.raises(ConfigError, match="TPESampler fails"):
            parse_campaign(bad)
    assert len(calls) == first + 2  # a failure is never remembered


@pytest.mark.parametrize("raw, needle", [
    (campaign_dict(final={"seeds": 1000}), "final.seeds"),
    (campaign_dict(seed=2**32), "seed"),
    (campaign_dict({"repeats": 5}, search_seed=SEED_LIMIT - 2), "repeats"),
    (campaign_dict({"n_trials": 10**30}), "n_trials"),
])
def test_counts_and_seeds_are_bounded_by_the_schema(raw, needle):
    if "search_seed" in raw:
        raw["search"]["seed"] = raw.pop("search_seed")
    with pytest.raises(ConfigError, match=needle):
        parse_campaign(raw)


def test_overrides_and_python_campaigns_meet_the_same_bounds(tmp_path, tiny_data):
    c = parse_campaign(campaign_dict())
    with pytest.raises(ConfigError, match="final.seeds"):
        settings.apply(c, {"final.seeds": 1000})
    url = f"sqlite:///{tmp_path / 's.db'}"
    bad = Campaign(name="py", phases=(SearchPhase(name="a", n_trials=0, space=(
        Float("lam", 1e-4, 1e-2, log=True),)),))
    with pytest.raises(ConfigError, match="n_trials"):
        run_phase(bad, "a", tiny_data, url)  # validated before the storage is opened
    for first in (SEED_LIMIT, -1):  # one seed (final.seeds = 1) past the 32 bits, or below
        with pytest.raises(ConfigError, match="final run's seeds"):
            run_final(c, tiny_data, url, pick={"lam": 1e-3}, first_seed=first)
    with pytest.raises(ConfigError, match="workers"):
        run_phase(c, "coarse", tiny_data, url, workers=0)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("flag", ["--campaign", "--storage", "--data-dir"])
def test_an_empty_flag_value_is_refused_not_replaced_by_the_default(flag, tmp_path):
    proc = script("search", "status", flag, "", cwd=tmp_path)
    assert f"{flag} is empty" in one_error_line(proc)


# ---- 4. tracebacks -------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [5_000, 20_000])
def test_a_campaign_file_nested_thousands_of_levels_deep_is_one_error(tmp_path, depth):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_campaign(str(path))
    with pytest.raises(ConfigError, match="nested too deeply"):
        settings.parse_value("{a = " * depth + "}" * depth)


def write_results(folder):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"seeds": [{"seed": 0, "test_acc": 0.5}]}))
    (folder / "config.json").write_text(json.dumps({"n_s": 5, "cycles": 1}))
    (folder / "history_seed0.json").write_text(json.dumps([{"step": 0}]))


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong-type", "no-seeds", "missing",
                                    "directory", "not-utf8"])
def test_a_damaged_results_folder_is_one_error_naming_the_file(tmp_path, damage):
    folder = tmp_path / "final"
    write_results(folder)
    assert read_final(folder)["history"] == [{"step": 0}]  # control: the intact folder reads
    name = {"truncated": "metrics.json", "empty": "config.json", "wrong-type": "config.json",
            "no-seeds": "metrics.json", "missing": "history_seed0.json",
            "directory": "history_seed0.json", "not-utf8": "metrics.json"}[damage]
    path = folder / name
    if damage == "truncated":
        path.write_text(path.read_text()[:7])
    elif damage == "empty":
        path.write_text("")
    elif damage == "wrong-type":
        path.write_text("[1, 2]")
    elif damage == "no-seeds":
        path.write_text('{"seeds": [3]}')
    elif damage == "missing":
        path.unlink()
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match=name):
        read_final(folder)
    assert read_final(folder, strict=False) is None  # a run about to rewrite it goes on


def confirm_study(verdict):
    study = optuna.create_study(direction="maximize")
    record.update(study, candidates=[{"params": {"lam": 1e-3}}, {"params": {"lam": 1e-2}}],
                  verdict=verdict)
    return study


GOOD_VERDICT = {"pick": 1, "params": {"lam": 1e-2}, "sentence": "lam=0.01 …",
                "scores": {"0": [0.4, 0.5], "1": [0.5, 0.6]}, "dropped": {},
                "means": {"0": 0.45, "1": 0.55}}


@pytest.mark.parametrize("change", [{"pick": 7}, {"pick": "1"}, {"means": []}, {"scores": []}])
def test_a_verdict_naming_a_candidate_that_does_not_exist_is_one_error(change):
    phase = ConfirmPhase(name="confirm", sources=("coarse",))
    assert phase.best(confirm_study(GOOD_VERDICT))[0] == {"lam": 1e-2}  # control
    study = confirm_study({**GOOD_VERDICT, **change})
    with pytest.raises(InputError, match="verdict"):
        phase.best(study)  # what final.py and the pipeline pick from
    from clr_lambda_search.search.report import best_row, confirm_summary

    for reader in (best_row, confirm_summary):  # what status and the dashboard show
        with pytest.raises(InputError, match="verdict"):
            reader(study)


# ---- 5. hangs ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["config.json", "history_seed0.json"])
def test_a_fifo_in_a_results_folder_is_refused_without_blocking(tmp_path, name):
    folder = tmp_path / "final"
    write_results(folder)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(InputError, match=f"{name} is not a regular file"):
        read_final(folder)


@pytest.mark.timeout(30)
def test_fifos_read_back_anywhere_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.json")
    os.mkfifo(tmp_path / "p.npz")
    with pytest.raises(InputError, match="not a regular file"):
        load_json(tmp_path / "x.json")
    with pytest.raises(InputError, match="not a regular file"):
        load_params(tmp_path / "p.npz")


# ---- 6. another data set taken for the same one ----------------------------------------------------

def test_a_cache_entry_whose_labels_changed_is_another_data_set(cifar_tiny_dir, tmp_path):
    folder = tmp_path / "batches"
    shutil.copytree(cifar_tiny_dir.batches, folder)
    cache = tmp_path / "cache"
    fresh = load_cifar10(folder, n_val=20, cache_dir=cache)
    again = load_cifar10(folder, n_val=20, cache_dir=cache)  # from the cache: the same data
    assert again.fingerprint == fresh.fingerprint
    (entry,) = (cache / "arrays").iterdir()
    y = np.load(entry / "val_y.npy")
    y[0] = (y[0] + 1) % 10
    np.save(entry / "val_y.npy", y)
    changed = load_cifar10(folder, n_val=20, cache_dir=cache)
    assert changed.val.y[0] == y[0]  # the cache was used, labels changed …
    assert changed.fingerprint != fresh.fingerprint  # … so it is another data set to a study


def test_validation_pixels_come_from_the_cached_pixels(cifar_tiny_dir, tmp_path):
    folder = tmp_path / "batches"
    shutil.copytree(cifar_tiny_dir.batches, folder)
    cache = tmp_path / "cache"
    fresh = load_cifar10(folder, n_val=20, cache_dir=cache)
    (entry,) = (cache / "arrays").iterdir()
    raw = np.load(entry / "val_pixels.npy")
    raw[0, 0] ^= 1
    np.save(entry / "val_pixels.npy", raw)
    changed = load_cifar10(folder, n_val=20, cache_dir=cache)
    assert changed.fingerprint != fresh.fingerprint
    assert not np.array_equal(changed.val.X, fresh.val.X)  # what is validated on is what is hashed


# ---- 7. a changed grid accepted on resume --------------------------------------------------------

def test_a_grid_resumed_with_other_values_of_the_same_range_is_refused(tmp_path, tiny_data):
    url = f"sqlite:///{tmp_path / 's.db'}"

    def grid(values):
        return parse_campaign(campaign_dict({"params": {"lam": {"values": values}},
                                             "n_trials": len(values)}))
    run_phase(grid([1e-3, 1e-2]), "coarse", tiny_data, url)
    with pytest.raises(InputError, match="grid"):
        run_phase(grid([1e-3, 3e-3, 1e-2]), "coarse", tiny_data, url)
    run_phase(grid([1e-2, 1e-3]), "coarse", tiny_data, url)  # the same values: resumed


# ---- 9. unclear messages -------------------------------------------------------------------------

def test_the_storage_given_as_data_dir_is_named_as_such(tmp_path):
    path = tmp_path / "studies.db"
    open_storage(f"sqlite:///{path}")
    with pytest.raises(DataError) as e:
        load_cifar10(path, cache_dir=tmp_path / "cache")
    assert "SQLite database" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_missing_driver_is_named_not_none(tmp_path):
    pytest.importorskip("sqlalchemy")
    try:
        import MySQLdb  # noqa: F401
        pytest.skip("a MySQL driver is installed here")  # pragma: no cover
    except ImportError:
        pass
    with pytest.raises(InputError) as e:
        open_storage("mysql://u:pw@127.0.0.1:1/db")
    assert "(None)" not in str(e.value) and "mysql://" in str(e.value) and "pw" not in str(e.value)


def test_a_five_thousand_character_name_is_not_echoed_whole():
    from clr_lambda_search.search.cli.errors import one_line  # what every error line goes through

    line = one_line(f"--campaign {'a' * 5000!r} must be 1–100 letters\nand more")
    assert len(line) < 200 and "(5002 characters)" in line and "\n" not in line


def test_run_phase_refuses_the_names_the_dashboard_refuses(tmp_path, tiny_data):
    for name in ("a/b", "..", "-x", "x" * 101):
        with pytest.raises(ConfigError, match="letters, digits"):
            api_run_phase(name, (Float("lam", 1e-4, 1e-2, log=True),), tiny_data,
                          f"sqlite:///{tmp_path / 's.db'}", n_trials=1, config=TrainConfig(**TINY))
    assert not (tmp_path / "s.db").exists()


@pytest.mark.timeout(30)
def test_a_fifo_as_the_storage_is_named_not_a_disk_error(tmp_path):
    os.mkfifo(tmp_path / "s.db")
    for create in (True, False):
        with pytest.raises(InputError, match="not a regular file"):
            open_storage(f"sqlite:///{tmp_path / 's.db'}", create=create)

"""The campaign core: the API runs every phase kind and the final run and returns the result;
a stale later phase is refused in one line and retired; every loop ends (a pruner that prunes
everything, an objective that returns NaN); overrides reach every key; and the code keeps its
shape (no kind branches outside the phase types, thin scripts, no import cycles)."""
import ast
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import faultlib as fl
from clr_lambda_search.model.errors import ConfigError, InputError
from clr_lambda_search.search import record, settings
from clr_lambda_search.search.api import run_campaign, run_phase
from clr_lambda_search.search.campaign import load_campaign, parse_campaign
from clr_lambda_search.search.core import retire
from clr_lambda_search.search.phases import StalePhase
from clr_lambda_search.search.space import Float
from clr_lambda_search.search.study import open_storage
from clr_lambda_search.search.workers import PhaseStopped, TrialTarget, work

ROOT = Path(__file__).resolve().parents[1]
TINY = {"search.m": 10, "search.n_batch": 10, "search.n_s": 5, "search.cycles": 1,
        "search.eval_train_samples": 0, "search.dtype": "float64",
        "phases.coarse.n_trials": 4, "phases.fine.n_trials": 3, "phases.confirm.seeds": 3,
        "phases.coarse.pruner": "none", "phases.fine.pruner": "none",
        "final.seeds": 2, "final.n_s": 5, "final.cycles": 1, "final.m": 10, "final.n_batch": 10,
        "final.eval_train_samples": 0, "final.dtype": "float64"}


@pytest.mark.timeout(300)
def test_run_campaign_races_confirm_and_trains_the_pick(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    result = run_campaign("dd2424", tiny_data, url, overrides=TINY, out_dir=tmp_path / "out")
    storage = open_storage(url)
    confirm = optuna.load_study(study_name="cifar10-confirm", storage=storage)
    rec = record.read(confirm)
    # the confirm phase raced its candidates: one COMPLETE trial per (candidate, seed) trained
    pairs = [record.queue_key(t) for t in confirm.trials if t.state == TrialState.COMPLETE]
    assert len(pairs) == len(set(pairs)) >= 2 * 3
    assert result.verdict == rec.verdict and result.verdict["sentence"]
    assert result.pick == {"lam": rec.verdict["params"]["lam"]}
    # the final run trained that pick, each seed once, and the result says where it is
    final = optuna.load_study(study_name="cifar10-final", storage=storage)
    assert sorted(t.user_attrs["seed"] for t in final.trials) == [0, 1]
    assert all(t.params == {**result.pick, "seed": t.user_attrs["seed"]} for t in final.trials)
    assert result.final["test_acc_mean"] == pytest.approx(
        sum(t.value for t in final.trials) / 2)
    assert Path(result.outputs["final"], "metrics.json").is_file()
    assert Path(result.outputs["dashboard"]).is_file()
    assert [p["study"] for p in result.phases] == ["cifar10-coarse", "cifar10-fine",
                                                   "cifar10-confirm"]


@pytest.mark.timeout(300)
def test_a_stale_phase_is_refused_in_one_line_until_retired(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    overrides = {k: v for k, v in TINY.items() if not k.startswith("phases.confirm")}
    campaign = _without_confirm()
    run_campaign(campaign, tiny_data, url, overrides=overrides, out_dir=tmp_path / "out",
                 dashboard=False)
    storage = open_storage(url)
    coarse = optuna.load_study(study_name="stale-coarse", storage=storage)
    # coarse changes after fine was derived from it: a trial better than all its others
    coarse.add_trial(optuna.trial.create_trial(
        params={"lam": 0.5e-2}, distributions={"lam": optuna.distributions.FloatDistribution(
            1e-5, 1e-1, log=True)}, value=1.0))
    with pytest.raises(StalePhase) as e:
        run_campaign(campaign, tiny_data, url, overrides=overrides, out_dir=tmp_path / "out",
                     dashboard=False)
    assert "\n" not in str(e.value) and "retire fine" in str(e.value)
    assert "stale-fine" in retire(campaign, "fine", storage)[0]
    result = run_campaign(campaign, tiny_data, url, overrides=overrides,
                          out_dir=tmp_path / "out", dashboard=False)
    fine = optuna.load_study(study_name="stale-fine", storage=storage)
    assert coarse.trials[-1].number in record.read(fine).narrowed["from_trials"]
    assert result.phases[1]["study"] == "stale-fine"
    # the retired study is kept under a name of its own, out of the campaign
    assert "stale-fine.retired-1" in optuna.get_all_study_names(storage)


def _without_confirm():
    c = load_campaign("dd2424")
    import dataclasses

    return dataclasses.replace(c, name="stale", phases=c.phases[:2])


@pytest.mark.timeout(120)
def test_a_pruner_that_prunes_everything_stops_the_phase(tmp_path, tiny_data):
    raw = {"name": "prune", "search": {"m": 10, "n_batch": 10, "n_s": 5, "cycles": 2,
                                       "eval_train_samples": 0, "dtype": "float64"},
           "phases": [{"name": "a", "n_trials": 2, "max_pruned": 6,
                       "pruner": {"name": "ThresholdPruner", "lower": 2.0},
                       "params": {"lam": {"low": 1e-5, "high": 1e-1, "log": True}}}]}
    url = fl.sqlite_url(tmp_path / "s.db")
    with pytest.raises(PhaseStopped) as e:
        run_campaign(parse_campaign(raw), tiny_data, url, dashboard=False)
    assert "\n" not in str(e.value) and "ThresholdPruner" in str(e.value)
    study = optuna.load_study(study_name="prune-a", storage=open_storage(url))
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 6


@pytest.mark.timeout(120)
def test_an_objective_returning_nan_fails_once_and_the_loop_ends(tmp_path):
    storage = open_storage(fl.sqlite_url(tmp_path / "s.db"))
    study = optuna.create_study(study_name="nan", storage=storage, direction="maximize")

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        return math.nan
    with pytest.raises(PhaseStopped) as e:
        work(study, objective, TrialTarget(3, max_failed=4))
    assert "non-finite" in str(e.value)
    trials = study.get_trials()
    # each failed once with its reason: none was taken for a dead worker's and re-queued
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert all(record.NOT_FINITE in record.failure(t) for t in trials)


def test_run_phase_checks_its_arguments_before_the_storage(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    for kwargs in ({"repeats": 0}, {"n_trials": 0}, {"workers": 0}):
        args = {"n_trials": 2, **kwargs}
        with pytest.raises(ConfigError):
            run_phase("x", (Float("lam", 1e-5, 1e-1, log=True),), tiny_data, url, **args)
    assert not (tmp_path / "s.db").exists()


def test_every_key_of_the_schema_can_be_overridden():
    c = load_campaign("dd2424")
    examples = {int: 3, float: 0.5, bool: True, str: "float64"}
    for key in settings.keys(c):
        value = _example(key, examples)
        try:
            changed = settings.apply(c, {key: value})
        except ConfigError as e:
            assert "unknown setting" not in str(e), key  # a value out of range is refused
            continue
        assert settings.get(changed, key) == value, key


def _example(key, examples):
    last = key.split(".")[-1]
    if last in ("sampler",):
        return "tpe"
    if last in ("pruner",):
        return "none"
    if last == "n_s" and key.startswith("final"):
        return "3 epochs"
    if last == "dtype":
        return "float64"
    if last in ("flip",):
        return True
    if last in ("lam", "eta_min", "eta_max", "dropout", "margin"):
        return 0.01 if last != "eta_max" else 0.2
    return 3


def test_an_unknown_key_names_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean phases.coarse.n_trials"):
        settings.apply(load_campaign("dd2424"), {"phases.coarse.n_trial": 4})
    with pytest.raises(ConfigError, match="is not a int"):
        settings.apply(load_campaign("dd2424"), {"phases.coarse.n_trials": "many"})


# ---- the shape of the code ----------------------------------------------------------------------

PHASE_TYPES = {"search/phases.py", "search/final.py", "search/record.py", "search/campaign.py"}


def _sources(*folders):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def test_no_module_outside_the_phase_types_branches_on_a_kind():
    found = []
    for name, tree in _sources("search", "scripts"):
        if name in PHASE_TYPES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if "kind" in text and ("confirm" in text or "search" in text or "final" in text):
                    found.append(f"{name}:{node.lineno}: {text}")
    assert not found


def test_scripts_are_launchers():
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        ours = [m for m in imported if m.split(".")[0] == "clr_lambda_search"]
        assert ours and all(m.startswith("clr_lambda_search.search.cli") for m in ours), path.name
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], \
            path.name


def test_no_two_modules_import_each_other_in_a_circle():
    graph = {}
    for name, tree in _sources("model", "search"):
        mod = "clr_lambda_search." + name[:-3].replace("/", ".").removesuffix(".__init__")
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _find_cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_cli_errors_of_a_bad_override_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pipeline.py"), "--set",
                           "phases.coarse.n_trial=3", "--storage",
                           fl.sqlite_url(tmp_path / "s.db")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "phases.coarse.n_trials" in proc.stderr
    assert not (tmp_path / "s.db").exists()


@pytest.mark.timeout(120)
def test_a_study_never_mixes_precisions(tmp_path, tiny_data, monkeypatch):
    from clr_lambda_search.search import core, phases

    raw = {"name": "prec", "search": {"m": 10, "n_batch": 10, "n_s": 5, "cycles": 1,
                                      "eval_train_samples": 0, "precision": "auto"},
           "phases": [{"name": "a", "n_trials": 1, "pruner": "none",
                       "params": {"lam": {"low": 1e-5, "high": 1e-1, "log": True}}}],
           "final": {"seeds": 1, "n_s": 5, "cycles": 1, "m": 10, "n_batch": 10}}
    url = fl.sqlite_url(tmp_path / "s.db")
    campaign = parse_campaign(raw)
    study, _ = core.run_phase(campaign, "a", tiny_data, url)
    resolved = record.read(study).precision
    assert resolved in ("fp32", "bf16") and record.read(study).config["precision"] == resolved
    other = "bf16" if resolved == "fp32" else "fp32"
    monkeypatch.setattr(phases, "resolve_precision", lambda requested: (other, "test"))
    with pytest.raises(InputError, match=f"trained in {resolved}"):
        core.run_phase(campaign, "a", tiny_data, url)

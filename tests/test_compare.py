"""The comparison with plain Optuna (search.compare), on tiny data: one seed, a tiny budget."""
import json
import tomllib

import numpy as np
import pytest

from clr_lambda_search.search import compare
from clr_lambda_search.search.campaign import locate, parse_campaign

TINY = {"search.n_s": 5, "search.cycles": 1, "search.n_batch": 10, "search.eval_train_samples": 0,
        "phases.coarse.n_trials": 4, "phases.fine.n_trials": 3, "phases.confirm.seeds": 2,
        "phases.confirm.top_k": 2, "final.n_s": 5, "final.cycles": 1, "final.n_batch": 10,
        "final.eval_train_samples": 0}


@pytest.mark.timeout(300)
def test_compare_spends_equal_updates_and_reports_every_method(tiny_data, tmp_path):
    result = compare.compare(tiny_data, overrides=TINY, seeds=[3], reeval_seeds=(2000, 2001),
                             storage_dir=tmp_path / "db", workers=1)
    runs = {r["method"]: r for r in result["runs"]}
    assert sorted(runs) == sorted(compare.METHODS)
    trial = 2 * 5 * 1  # one full search trial, in updates
    service = runs["service"]
    # coarse, fine and confirm, pruned trainings included (the confirm's 2 × 2 never pruned)
    assert service["trials"] >= 4 + 3 + 2 * 2 and service["updates"] >= 2 * 2 * trial
    for m in compare.BASELINES:  # the same budget, rounded up to whole trials, never pruned
        assert service["updates"] <= runs[m]["updates"] < service["updates"] + trial
        assert runs[m]["pruned"] == 0 and runs[m]["updates"] == runs[m]["trials"] * trial
    assert result["budgets"]["3"]["max_excess"] < trial
    for r in runs.values():
        assert len(r["reeval_vals"]) == 2 and 0 <= r["reeval_val"] <= 1
        assert 0 <= r["test_acc"] <= 1
        assert r["incumbents"][-1]["params"] == r["pick"]  # the best trial, or the verdict
        xs = [p["updates"] for p in r["incumbents"]]
        assert xs == sorted(xs) and xs[-1] <= r["updates"]
    assert service["incumbents"][-1]["params"] == service["pick"]  # the verdict ends its path
    assert service["incumbents"][-1]["updates"] == service["updates"]
    d = result["differences"]["service-tpe:reeval_val"]
    assert d["n"] == 1 and d["ci95"] is None  # one seed: no interval
    assert np.isclose(d["mean"], service["reeval_val"] - runs["tpe"]["reeval_val"])
    a = result["anytime"]
    assert len(a["updates"]) == len(a["service"]) == len(a["tpe"])
    json.dumps(result, allow_nan=False)  # what the command writes
    saved = json.loads((tmp_path / "db" / "trained.json").read_text())  # a rerun retrains none
    assert len(saved["vals"]) == 2 * len({compare.key(p["params"]) for r in runs.values()
                                          for p in r["incumbents"]})
    png = compare.plot_anytime(result, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def tiny_compare4():
    """The shipped 4-parameter campaign with its n_s and n_batch ranges shrunk to tiny data."""
    raw = tomllib.loads(locate("compare4").read_text())
    coarse = raw["phases"][0]["params"]
    assert sorted(coarse) == ["eta_max", "lam", "n_batch", "n_s"]  # the space the docs name
    coarse.update(n_s={"low": 4, "high": 6, "step": 1}, n_batch={"choices": [5, 10]})
    raw["config"]["precision"] = "fp32"  # D = 20: bf16 products are for the real widths
    return parse_campaign(raw)


@pytest.mark.timeout(300)
def test_compare_on_the_four_parameter_campaign(tiny_data, tmp_path):
    tiny = {k: v for k, v in TINY.items() if k not in ("search.n_s", "search.n_batch")}
    result = compare.compare(tiny_data, campaign=tiny_compare4(), overrides=tiny, seeds=[0],
                             reeval_seeds=(2000,), storage_dir=tmp_path / "db", workers=1,
                             final=False)
    runs = {r["method"]: r for r in result["runs"]}
    longest = 2 * 6 * 1  # the costliest trial: 1 cycle of n_s = 6, in updates
    for m in compare.BASELINES:
        assert runs["service"]["updates"] <= runs[m]["updates"] < runs["service"]["updates"] + longest
        # the baselines search the same four parameters
        assert sorted(runs[m]["pick"]) == ["eta_max", "lam", "n_batch", "n_s"]
    assert sorted(runs["service"]["pick"]) == ["eta_max", "lam", "n_batch", "n_s"]
    assert result["campaign"] == "compare4"


def test_paired_differences_have_a_t_interval():
    row = compare.paired([0.52, 0.51, 0.53], [0.50, 0.50, 0.50])
    assert np.isclose(row["mean"], 0.02) and row["ci95"][0] < 0.02 < row["ci95"][1]
    assert row["p"] < 0.2 and compare.paired([0.5, 0.5], [0.5, 0.5])["ci95"] is None


@pytest.mark.parametrize("argv, says", [
    (["--out", "/nonexistent/dir/c.json"], "--out /nonexistent/dir/c.json: its folder"),
    (["--campaign-seeds", "0"], "--campaign-seeds must be ≥ 1"),
    (["--workers", "999"], "--workers 999 is more than"),
])
def test_bench_search_refuses_bad_flags_in_one_line(argv, says, capsys):
    from clr_lambda_search.search.cli import bench

    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--search", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says in err and len(err.splitlines()) == 1


def test_bench_search_needs_cifar(no_cifar_env, tmp_path):
    from clr_lambda_search.model.errors import ConfigError
    from clr_lambda_search.search.cli import bench

    args = bench.parse_args(["--search", "--out", str(tmp_path / "c.json")])
    with pytest.raises(ConfigError, match="needs CIFAR-10"):
        bench.search_main(args)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.timeout(300)
def test_a_rule_runs_at_the_campaigns_own_spend_per_phase(tiny_data, tmp_path):
    # dd2424's search phases with their margin-median pruner ("own") against no pruner ("rule"),
    # each rule phase given what own spent in it: never less, at most one trial more
    tiny = {**TINY, "phases.confirm.seeds": 2}
    from clr_lambda_search.search import settings
    from clr_lambda_search.search.campaign import load_campaign

    c = settings.apply(load_campaign("dd2424"), tiny)
    result = compare.compare_rule(tiny_data, campaign=c, rule="none", seeds=[1],
                                  reeval_seeds=(2000,), storage_dir=tmp_path / "db")
    own, rule = result["runs"]
    assert (own["method"], rule["method"]) == ("own", "rule") and rule["pruned"] == 0
    trial = 2 * 5 * 1
    for phase in ("coarse", "fine"):
        assert own["phase_updates"][phase] <= rule["phase_updates"][phase] \
            < own["phase_updates"][phase] + trial
    assert "confirm" in own["phase_updates"] and result["own_pruners"]["coarse"] == "median"
    d = result["differences"]["rule-own:reeval_val"]
    assert d["n"] == 1 and np.isclose(d["mean"], rule["reeval_val"] - own["reeval_val"])
    json.dumps(result, allow_nan=False)

"""Campaign files through the real scripts on the tiny CIFAR-10: a campaign searching η_max alone
and one searching m run coarse → narrowed → final with no code change, and every output (status
text and --json, final config and metrics, dashboard) carries their parameters and no λ."""
import json
import subprocess
import sys

import pytest

import faultlib as fl
from clr_lambda_search.model.precision import bf16_missing

SCRIPTS = fl.REPO / "scripts"
BF16_MISSING = bf16_missing()
# tiny protocol shared by the campaigns below: a trial is a few dozen updates
COMMON = """
[search]
n_batch = 20
n_s = 10
cycles = 1
evals_per_cycle = 2
eval_train_samples = 0

[final]
seeds = 1
n_s = 10
cycles = 1
"""
ETA_MAX = COMMON + """
[[phases]]
name = "coarse"
n_trials = 3
pruner = "none"
params.eta_max = { low = 1e-2, high = 2e-1, log = true }

[[phases]]
name = "fine"
n_trials = 2
pruner = "none"
narrow = { from = "coarse", top_k = 2, margin = 0.1 }
"""
M_ONLY = COMMON + """
[[phases]]
name = "coarse"
n_trials = 3
pruner = "none"
params.m = { low = 4, high = 40, step = 4 }

[[phases]]
name = "fine"
n_trials = 2
pruner = "none"
narrow = { from = "coarse", top_k = 2 }
"""


def script(name, args, env):
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=fl.REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module", params=["eta_max", "m"])
def ran(request, cifar_tiny_dir, tmp_path_factory):
    """pipeline.py --config FILE, then status (text and --json), on a fresh storage."""
    base = tmp_path_factory.mktemp(f"campaign_{request.param}")
    config = base / f"{request.param}.toml"
    config.write_text(f'name = "{request.param}"\n'
                      + (ETA_MAX if request.param == "eta_max" else M_ONLY))
    env = fl.script_env(base)
    common = ["--storage", fl.sqlite_url(base / "s.db")]
    pipe = script("pipeline.py", ["--config", config, *common, "--data-dir", cifar_tiny_dir.batches,
                                  "--n-val", "20", "--workers", "1", "--out-dir", base / "out",
                                  "--json"], env)
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    status = script("search.py", ["status", "--config", config, *common], env)
    status_json = script("search.py", ["status", "--config", config, *common, "--json"], env)
    return {"name": request.param, "base": base, "url": common[1], "pipe": json.loads(pipe.stdout),
            "status": status, "json": json.loads(status_json.stdout)}


@pytest.mark.timeout(600)
def test_a_campaign_searches_one_field_coarse_then_narrowed_then_final(ran):
    name = ran["name"]
    coarse, _ = fl.load_trials(ran["url"], f"{name}-coarse")
    fine, attrs = fl.load_trials(ran["url"], f"{name}-fine")
    # both phases searched that field alone
    assert all(set(t.params) == {name} for t in coarse + fine)
    # the narrowed phase's range was derived from the best 2 coarse trials (per parameter)
    (space,) = attrs["space"]
    best2 = sorted(fl.complete(coarse), key=lambda t: -t.value)[:2]
    assert space["low"] <= min(t.params[name] for t in best2)
    assert space["high"] >= max(t.params[name] for t in best2)
    assert all(space["low"] <= t.params[name] <= space["high"] for t in fine)
    # the final run trained the best value of the campaign's last phase with a result (here
    # fine, which has no confirm phase after it: search.core.campaign_best)
    best = max(fl.complete(fine), key=lambda t: t.value)
    final_dir = ran["base"] / "out" / "final"
    config = json.loads((final_dir / "config.json").read_text())
    metrics = json.loads((final_dir / "metrics.json").read_text())
    assert config[name] == best.params[name] and metrics["params"] == {name: best.params[name]}
    assert ran["pipe"]["final"]["params"] == {name: best.params[name]}
    # the precision the products ran in, in the summary and the metrics (fp32: these campaigns')
    assert ran["pipe"]["final"]["precision"] == metrics["precision"] == config["precision"] == "fp32"
    if name == "m":  # the trained W1 has the best m hidden units
        import numpy as np
        with np.load(next(final_dir.glob("params*.npz"))) as z:
            assert z["W1"].shape == (3072, best.params["m"])


@pytest.mark.timeout(600)
def test_outputs_show_the_searched_field_and_no_lambda(ran):
    name = ran["name"]
    # status --json: its values are the trials' own params
    for study in ran["json"]["studies"]:
        trials, _ = fl.load_trials(ran["url"], study["name"])
        by_number = {t.number: t for t in trials}
        assert study["params"] == [name]
        assert all(r["params"] == by_number[r["number"]].params for r in study["trials"])
    # the text, the summary and the dashboard (past plotly.js in its head) name the field, never λ
    page = (ran["base"] / "out" / "dashboard.html").read_text().split("</head>", 1)[1]
    assert f"Validation accuracy over {name}" in page
    for text in (ran["status"].stdout, json.dumps(ran["pipe"]), page):
        assert name in text and "lam" not in text and "λ" not in text


@pytest.mark.timeout(600)
@pytest.mark.skipif(BF16_MISSING is not None, reason=f"bf16 cannot run here: {BF16_MISSING}")
def test_a_bf16_campaign_runs_in_worker_processes(cifar_tiny_dir, tmp_path):
    """precision = "bf16" with two worker processes (forked after the bf16 library is loaded:
    MKL's sequential layer, or oneDNN on one OpenMP thread, must not hang them): every trial
    completes, the study records bf16, and the final run says so."""
    config = tmp_path / "bf16.toml"
    config.write_text('name = "bf16"\n[config]\nprecision = "bf16"\n' + ETA_MAX)
    url = fl.sqlite_url(tmp_path / "s.db")
    pipe = script("pipeline.py", ["--config", config, "--storage", url, "--data-dir",
                                  cifar_tiny_dir.batches, "--n-val", "20", "--workers", "2",
                                  "--out-dir", tmp_path / "out", "--json"], fl.script_env(tmp_path))
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    for phase, n in (("coarse", 3), ("fine", 2)):
        trials, attrs = fl.load_trials(url, f"bf16-{phase}")
        # (two runners may start one trial past a phase's count: it is recorded surplus)
        assert len(fl.complete(trials)) == n and not fl.unfinished(trials), phase
    metrics = json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())
    assert json.loads(pipe.stdout)["final"]["precision"] == metrics["precision"] == "bf16"

"""scripts/gradcheck.py and scripts/train.py run as users run them, on the tiny CIFAR-10.

All the processes of this module start at once (module fixture) and the tests then read their
results, so the start-ups (about 1 s of CPU each: the scripts import matplotlib and optuna) run
on all cores at once instead of one after the other.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--n-val", "20", "--n-s", "5", "--cycles", "1", "--eval-train-samples", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# id -> (script, extra args, text the one-line error must contain). Every case has a valid
# --data-dir (the tiny fixture) and --out (<case dir>/run) unless the case itself replaces them.
BAD_INPUT = {
    "negative-lam": ("train.py", ["--lam", "-1"], "lam"),
    "n_s-zero": ("train.py", ["--n-s", "0"], "n_s"),
    "cycles-zero": ("train.py", ["--cycles", "0"], "cycles"),
    "eta-min-above-max": ("train.py", ["--eta-min", "0.2", "--eta-max", "0.1"], "eta_max"),
    "dtype-float16": ("train.py", ["--dtype", "float16"], "float16"),
    "data-dir-missing": ("train.py", ["--data-dir", "/nonexistent"], "/nonexistent"),
    "data-dir-empty": ("train.py", ["--data-dir", "{empty}"], "no CIFAR-10 batches"),
    "data-dir-truncated": ("train.py", ["--data-dir", "{truncated}"], "data_batch_1"),
    "out-is-a-file": ("train.py", ["--out", "{file}"], "is a file"),
    "unknown-flag": ("train.py", ["--no-such-flag"], "--no-such-flag"),
    "gradcheck-lam-zero": ("gradcheck.py", ["--lam", "0"], "--lam"),
    "negative-seed": ("train.py", ["--seed", "-1"], "seed"),
    "dropout-negative": ("train.py", ["--dropout", "-0.1"], "dropout"),
    "dropout-one": ("train.py", ["--dropout", "1.0"], "dropout"),
    "shift-negative": ("train.py", ["--shift", "-1"], "shift"),
    "shift-32": ("train.py", ["--shift", "32"], "shift"),
    "flip-takes-no-value": ("train.py", ["--flip", "False"], "False"),
    "threads-zero": ("train.py", ["--threads", "0"], "--threads"),
    "gradcheck-dropout-one": ("gradcheck.py", ["--dropout", "1"], "--dropout"),
}
# dropout, augmentation, 2 cycles (a snapshot ensemble of 2) and both cores, on real-format images
REGULARISED = ["--m", "20", "--dropout", "0.3", "--flip", "--shift", "3", "--cycles", "2",
               "--threads", "2"]


def script_env(tmp):
    """The caller's environment minus $CIFAR10_*, with the download cache in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    env["CIFAR10_CACHE"] = str(tmp / "cache")
    return env


def start(script, args, env):
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(cifar_tiny_dir, tmp_path_factory):
    """Start every run of this module at once -> {id: (returncode, stdout, stderr, case dir)}."""
    base = tmp_path_factory.mktemp("scripts")
    env = script_env(base)
    (base / "empty").mkdir()
    truncated = base / "truncated" / "cifar-10-batches-py"
    shutil.copytree(cifar_tiny_dir.batches, truncated)
    raw = (truncated / "data_batch_1").read_bytes()
    (truncated / "data_batch_1").write_bytes(raw[:len(raw) // 2])
    (base / "a-file").write_text("keep me")
    subst = {"{empty}": str(base / "empty"), "{truncated}": str(truncated),
             "{file}": str(base / "a-file")}
    data = ["--data-dir", str(cifar_tiny_dir.batches)]

    procs = {
        "gradcheck": (start("gradcheck.py", data + ["--n-val", "20", "--json"], env), base),
        "train": (start("train.py", data + TINY_TRAIN + ["--out", str(base / "train" / "run"),
                                                          "--json"], env), base / "train"),
        "regularised": (start("train.py", data + TINY_TRAIN + REGULARISED + [
            "--out", str(base / "regularised" / "run"), "--json"], env), base / "regularised"),
        "diverged": (start("train.py", data + TINY_TRAIN + [
            "--eta-max", "1e4", "--lam", "10", "--out", str(base / "diverged" / "run")], env),
            base / "diverged"),
    }
    for case, (script, extra, _) in BAD_INPUT.items():
        case_dir = base / case
        case_dir.mkdir()
        extra = [subst.get(a, a) for a in extra]
        args = data
        if script == "train.py":
            args = data + TINY_TRAIN + ["--out", str(case_dir / "run")]
        procs[case] = (start(script, args + extra, env), case_dir)
    results = {}
    try:
        for key, (proc, case_dir) in procs.items():
            out, err = proc.communicate(timeout=300)
            results[key] = (proc.returncode, out, err, case_dir)
    finally:  # a hung run: stop the processes this fixture started, and only those
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def test_gradcheck_script_passes_on_real_format_data(runs):
    code, out, err, _ = runs["gradcheck"]
    assert code == 0, err
    summary = json.loads(out)  # stdout is exactly one JSON object (logs go to stderr)
    assert isinstance(summary, dict) and len(out.strip().splitlines()) == 1
    assert summary["passed"] is True
    assert [c["lam"] for c in summary["checks"]] == [0.0, 0.1]  # λ = 0 and a λ that matters
    for check in summary["checks"]:
        errors = check["max_rel_error"]
        assert set(errors) == {"W1", "b1", "W2", "b2"}
        # float64 centred differences: every key well below the report's 1e-5 bar
        assert all(e < 1e-6 for e in errors.values()), check


def test_train_script_writes_a_complete_run(runs, cifar_tiny_dir):
    code, out, err, case_dir = runs["train"]
    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert len(out.strip().splitlines()) == 1
    assert {"lam", "train_acc", "val_acc", "test_acc", "steps", "seconds", "out"} <= set(summary)
    run_dir = case_dir / "run"
    assert summary["lam"] == 0.01 and summary["steps"] == 10  # 2·n_s·cycles = 2·5·1
    assert summary["out"] == str(run_dir)
    assert all(0.0 <= summary[k] <= 1.0 for k in ("train_acc", "val_acc", "test_acc"))
    assert summary["seconds"] >= 0
    for name in ("params.npz", "config.json", "history.json", "metrics.json",
                 "cost.png", "loss.png", "accuracy.png", "lr.png"):
        assert (run_dir / name).is_file(), name
    for name in ("cost", "loss", "accuracy", "lr"):
        assert (run_dir / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name  # real PNG files
        svg = (run_dir / f"{name}.svg").read_text()  # and SVGs whose axes say what they show
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg, name
    # the saved files agree with the summary and with the settings that were asked for
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["n_s"], config["cycles"], config["lam"]) == (5, 1, 0.01)
    assert config["data"] == str(cifar_tiny_dir.batches)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_acc"] == summary["test_acc"] and metrics["steps"] == 10
    history = json.loads((run_dir / "history.json").read_text())
    assert history[0]["step"] == 0 and history[-1]["step"] == 10
    assert history[-1]["val"]["acc"] == summary["val_acc"]
    with np.load(run_dir / "params.npz") as z:
        assert {k: z[k].shape for k in z.files} == {
            "W1": (3072, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
    # nothing else next to the run folder: no temporary or old folders left behind
    assert [p.name for p in case_dir.iterdir()] == ["run"]


def test_train_script_with_dropout_augmentation_and_two_threads(runs):
    code, out, err, case_dir = runs["regularised"]
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 20 and summary["threads"] == 2
    assert 0.0 <= summary["test_acc_ensemble"] <= 1.0
    config = json.loads((case_dir / "run" / "config.json").read_text())
    assert (config["m"], config["dropout"], config["flip"], config["shift"]) == (20, 0.3, True, 3)
    metrics = json.loads((case_dir / "run" / "metrics.json").read_text())
    assert metrics["test_acc_ensemble"] == summary["test_acc_ensemble"]


def check_bad_input(runs, case, expected):
    code, out, err, case_dir = runs[case]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err  # the bad-input exit status
    assert "Traceback" not in err
    assert len(lines) == 1, err  # exactly one line, naming the problem ...
    assert expected in lines[0], lines[0]
    assert out == ""
    assert not (case_dir / "run").exists()  # ... and no half-written results folder


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(runs, case):
    check_bad_input(runs, case, BAD_INPUT[case][2])


def test_out_file_is_left_untouched(runs):
    assert runs["out-is-a-file"][3].parent.joinpath("a-file").read_text() == "keep me"


def test_diverged_training_is_one_line_and_exit_1(runs):
    code, out, err, case_dir = runs["diverged"]
    # not the input's fault in a way a flag check could catch: exit 1, but still one clear line
    assert code == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "diverged" in last and "η_max" in last
    assert out == ""
    assert not (case_dir / "run").exists()


def test_train_folder_name_covers_every_non_default_setting(tmp_path):
    """Two runs of other settings never share train.py's default folder, and a folder holding a
    run of other settings is refused (one line), whatever --out named it."""
    from clr_lambda_search.model.errors import InputError
    from clr_lambda_search.model.train import TrainConfig
    from clr_lambda_search.search.cli.train import check_same_run, run_name

    assert run_name(TrainConfig()) == "lam0.01-seed0"
    wide = TrainConfig(m=512, dropout=0.3, flip=True, eta_max=0.05, seed=2)
    assert run_name(wide, n_val=500) == "lam0.01-m512-eta_max0.05-dropout0.3-flip-n_val500-seed2"
    names = {run_name(TrainConfig(**{f: v})) for f, v in
             [("m", 100), ("n_batch", 50), ("n_s", 500), ("cycles", 2), ("shift", 2),
              ("precision", "bf16"), ("dtype", "float64"), ("eval_train_samples", 0)]}
    assert len(names) == 8 and "lam0.01-seed0" not in names
    (tmp_path / "config.json").write_text(json.dumps(vars(TrainConfig())))
    check_same_run(tmp_path, TrainConfig())  # a re-run of the same settings may replace it
    with pytest.raises(InputError, match=r"other settings \(m 50 \(now 512\)\)"):
        check_same_run(tmp_path, TrainConfig(m=512))


def test_a_script_starts_without_importing_scipy_stats():
    """scipy.stats costs ~1 s to import, paid by every start (an error, --help): the scripts'
    modules take it on their first t-test (search.confirm.ttest_rel)."""
    code = ("import sys; import clr_lambda_search.search.cli.command, "
            "clr_lambda_search.search.cli.pipeline, clr_lambda_search.search.compare; "
            "print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "False"

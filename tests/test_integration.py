"""The real scripts, end to end, on a real CIFAR-10 subset (the data users have, not a mock).

The subset is built once per session from the full data set that `make data` builds from
../shared/datasets (<repo>/.cache/cifar10/cifar-10-batches-py, or $CLR_TEST_CIFAR; built here
with make_cifar10.py when absent, ~20 s): the first 2,000 images of each of data_batch_1..5 and
of test_batch, written in the official layout (pickled dicts with bytes keys), so the scripts
read it through the same loader as the official files. 10,000 training images minus 1,000 for
validation are enough for the two-layer net to learn well above chance in a few hundred updates.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clr_lambda_search.model.batch_files import TEST_FILE, TRAIN_FILES, load_batch
from clr_lambda_search.search.record import SURPLUS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUILDER = REPO.parent / "shared" / "datasets" / "make_cifar10.py"
PER_BATCH = 2000
N_VAL = 1000
PIPELINE_ARGS = ["--coarse-trials", "3", "--fine-trials", "3", "--search-n-s", "100",
                 "--search-cycles", "1", "--final-n-s", "100", "--final-cycles", "1",
                 "--seeds", "2", "--workers", "2", "--campaign", "it", "--n-val", str(N_VAL),
                 "--json"]


def unavailable(why):
    """Real data is part of the suite: missing in CI is a failure, elsewhere a skip."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def full_cifar10():
    """The full python-format CIFAR-10 folder: $CLR_TEST_CIFAR, else .cache/cifar10 (built)."""
    given = os.environ.get("CLR_TEST_CIFAR")
    if given:
        path = Path(given)
        for candidate in (path, path / "cifar-10-batches-py"):
            if (candidate / TEST_FILE).is_file():
                return candidate
        unavailable(f"$CLR_TEST_CIFAR={given} holds no cifar-10-batches-py")
    folder = REPO / ".cache" / "cifar10" / "cifar-10-batches-py"
    if not (folder / TEST_FILE).is_file():
        if not BUILDER.is_file():
            unavailable(f"no CIFAR-10 at {folder} and no {BUILDER} to build it")
        proc = subprocess.run([sys.executable, str(BUILDER), str(folder.parent)],
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((folder / f).is_file() for f in TRAIN_FILES + [TEST_FILE]), folder
    return folder


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """cifar-10-batches-py with the first PER_BATCH images of every batch, in the real format."""
    source = full_cifar10()
    dest = tmp_path_factory.mktemp("cifar_subset") / "cifar-10-batches-py"
    dest.mkdir()
    for name in TRAIN_FILES + [TEST_FILE]:
        X, y = load_batch(source / name)  # the project's safe unpickler reads the originals
        assert X.shape == (10000, 3072) and X.dtype == np.uint8  # a full official batch
        batch = {b"batch_label": f"first {PER_BATCH} of {name}".encode(),
                 b"labels": [int(v) for v in y[:PER_BATCH]],
                 b"data": np.ascontiguousarray(X[:PER_BATCH]),
                 b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(PER_BATCH)]}
        (dest / name).write_bytes(pickle.dumps(batch, protocol=4))
    if (source / "batches.meta").is_file():
        shutil.copy(source / "batches.meta", dest)
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The caller's environment minus $CIFAR10_*, with the loader's cache in a tmp folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    env["CIFAR10_CACHE"] = str(tmp_path_factory.mktemp("integration_cache"))
    return env


def run_script(script, args, env, timeout=600):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc, time.monotonic() - start


def one_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no traceback in a successful run (a surplus trial of racing workers is failed silently)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: exactly one JSON object on stdout
    return json.loads(lines[0])


def assert_real_figure(path):
    """A PNG that Pillow opens, of a sensible size, with more than a few colours (a drawn plot:
    axes, text, anti-aliased lines), not a blank or single-colour canvas."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG", path
        w, h = img.size
        assert w >= 200 and h >= 150, (path, img.size)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 10, (path, len(colours or []))
    # the background is not the whole image: at least 1 % of the pixels carry ink
    background = max(colours)[0]
    assert background < 0.99 * w * h, path


def test_subset_is_the_real_format(cifar_subset):
    # guards the tests below: 5 × 2,000 training and 2,000 test images, labels of all 10 classes,
    # read back through the loader the scripts use
    for name in TRAIN_FILES + [TEST_FILE]:
        X, y = load_batch(cifar_subset / name)
        assert X.shape == (PER_BATCH, 3072) and X.dtype == np.uint8
        assert set(np.unique(y)) == set(range(10))
        assert X.std() > 20  # real images, not a constant


def test_train_learns_and_draws_its_figures(cifar_subset, env, tmp_path):
    out = tmp_path / "run"
    proc, _ = run_script("train.py", ["--data-dir", str(cifar_subset), "--n-val", str(N_VAL),
                                      "--n-s", "200", "--cycles", "1", "--out", str(out),
                                      "--json"], env)
    summary = one_json(proc)
    assert summary["steps"] == 400  # one cycle of 2·n_s updates
    # it learns: 10 classes means 0.10 by chance; one cycle on 9,000 images gives ~0.45
    assert summary["val_acc"] > 0.25, summary
    assert summary["test_acc"] > 0.25, summary
    history = json.loads((out / "history.json").read_text())
    assert history[0]["step"] == 0 and history[-1]["step"] == 400
    assert history[0]["val"]["acc"] < 0.2  # at initialisation: near chance ...
    assert history[-1]["val"]["loss"] < history[0]["val"]["loss"] - 0.3  # ... then it learned
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == str(cifar_subset)  # trained on the subset it was given
    for name in ("cost", "loss", "accuracy", "lr"):
        assert_real_figure(out / f"{name}.png")


def test_gradcheck_passes_on_real_images(cifar_subset, env):
    proc, _ = run_script("gradcheck.py", ["--data-dir", str(cifar_subset), "--n-val",
                                          str(N_VAL), "--json"], env)
    report = one_json(proc)
    assert report["passed"] is True
    assert [c["lam"] for c in report["checks"]] == [0.0, 0.1]  # λ = 0 and a λ that matters
    for check in report["checks"]:
        errors = check["max_rel_error"]
        assert set(errors) == {"W1", "b1", "W2", "b2"}  # every parameter checked
        # analytic vs centred differences on normalised real pixels: far below the 1e-5 bar
        assert all(0 <= e < 1e-7 for e in errors.values()), check


def trials_of(db, name):
    """[(number, λ, state, failure)] of a study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return [(t.number, t.params.get("lam"), t.state.name, t.user_attrs.get("failure"))
            for t in study.trials]


def file_state(path):
    st = path.stat()
    return st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_end_to_end_then_resumes(cifar_subset, env, tmp_path):
    db, out = tmp_path / "s.db", tmp_path / "campaign"
    args = ["--data-dir", str(cifar_subset), "--storage", f"sqlite:///{db}",
            "--out-dir", str(out), *PIPELINE_ARGS]
    proc, first_seconds = run_script("pipeline.py", args, env)
    first = one_json(proc)
    # every stage ran and reported
    assert first["gradcheck"]["passed"] is True
    coarse, fine, confirm = first["phases"]
    assert coarse["best"] and fine["best"] and confirm["best"]
    assert fine["narrowed"]["from_study"] == "it-coarse"
    (fr,) = fine["space"]
    assert 1e-5 <= fr["low"] < fr["high"] <= 1e-1
    assert fr["low"] <= fine["best"]["params"]["lam"] <= fr["high"]  # fine searched its range
    final = first["final"]
    # the confirm phase raced the best 3 of coarse and fine; the final run trains its pick
    verdict = first["verdict"]
    assert final["params"] == verdict["params"] == confirm["best"]["params"]
    assert verdict["sentence"] and len(verdict["scores"]) == 3
    tried = [t[1] for t in trials_of(db, "it-coarse") + trials_of(db, "it-fine")]
    assert verdict["params"]["lam"] in tried
    assert len(final["test_acc"]) == 2  # --seeds 2
    assert final["test_acc_mean"] > 0.2, final  # learned on real images (chance: 0.10)
    assert np.isclose(final["test_acc_mean"], np.mean(final["test_acc"]))
    metrics_path = out / "final" / "metrics.json"
    assert metrics_path.is_file() and (out / "dashboard.html").is_file()
    metrics = json.loads(metrics_path.read_text())
    assert metrics["params"] == final["params"]
    assert metrics["test_acc_mean"] == final["test_acc_mean"]
    page = (out / "dashboard.html").read_text()
    assert "it-coarse" in page and "it-fine" in page and "Final run" in page
    assert "Verdict:" in page and "it-confirm" in page
    trials = {p: trials_of(db, f"it-{p}") for p in ("coarse", "fine")}
    for phase, rows in trials.items():
        # exactly --coarse-trials / --fine-trials trained; any other trial is a surplus one
        # (two workers raced for the last slot: stopped before training, by design)
        assert sum(state == "COMPLETE" for _, _, state, _ in rows) == 3, (phase, rows)
        assert all(state == "COMPLETE" or failure == SURPLUS
                   for _, _, state, failure in rows), (phase, rows)

    final_files = {p.name: file_state(p) for p in (out / "final").iterdir()}
    proc, second_seconds = run_script("pipeline.py", args, env)
    second = one_json(proc)
    # resume: the same λ and results, no new trial, and the final run was not redone
    assert second["final"] == final and second["phases"] == first["phases"]
    assert {p: trials_of(db, f"it-{p}") for p in ("coarse", "fine")} == trials
    assert {p.name: file_state(p) for p in (out / "final").iterdir()} == final_files
    assert second_seconds < first_seconds, (first_seconds, second_seconds)

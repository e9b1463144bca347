"""Output-path safety: the project never deletes or overwrites a file or folder it did not create.

Scripts run as a user would (subprocesses, cwd = the repo root); each refusal must be one line,
exit 2, and leave the user's folder exactly as it was (tests/test_cli_errors.py's snapshot).
"""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from clr_lambda_search.model.checkpoint import save_page
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.outputs import (MANIFEST, PAGE_TAG, check_page, check_results_dir, clean_stale,
                           is_page, publish_dir)
from test_cli_errors import diff, script_env, snapshot

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n-val", "20", "--n-s", "5", "--cycles", "1"]


def run(script, args, tmp_path):
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "--json"],
                          cwd=REPO, env=script_env(tmp_path / "_cache"), capture_output=True,
                          text=True, timeout=300, check=False)


def assert_refused(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture
def user_dir(tmp_path):
    """A user's folder: a thesis and an SQLite study storage (what `--out` must never wipe)."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work\n")
    with sqlite3.connect(folder / "studies.db") as db:
        db.execute("create table t (x)")
    return folder


# ---- the reported cases: scripts that replaced a user's folder or file, exit 0 -------------------

def test_train_out_refuses_a_user_folder(user_dir, tmp_path, cifar_tiny_dir):
    before = snapshot(user_dir)
    proc = run("train.py", ["--data-dir", str(cifar_tiny_dir.batches), *TINY, "--out", str(user_dir)],
               tmp_path)
    assert_refused(proc, str(user_dir))
    assert diff(before, snapshot(user_dir)) == {"created": [], "deleted": [], "changed": []}


def test_final_out_refuses_a_user_folder(user_dir, tmp_path, cifar_tiny_dir):
    before = snapshot(user_dir)
    proc = run("final.py", ["--lam", "0.01", "--seeds", "1", "--data-dir",
                            str(cifar_tiny_dir.batches), *TINY, "--out", str(user_dir)], tmp_path)
    assert_refused(proc, str(user_dir))
    assert diff(before, snapshot(user_dir)) == {"created": [], "deleted": [], "changed": []}


def test_final_out_refuses_the_folder_of_its_own_storage(tmp_path, cifar_tiny_dir):
    folder = tmp_path / "studies"
    folder.mkdir()
    with sqlite3.connect(folder / "studies.db") as db:
        db.execute("create table t (x)")
    before = snapshot(folder)
    proc = run("final.py", ["--lam", "0.01", "--seeds", "1", "--data-dir",
                            str(cifar_tiny_dir.batches), *TINY, "--storage",
                            f"sqlite:///{folder / 'studies.db'}", "--out", str(folder)], tmp_path)
    assert_refused(proc, "storage")
    assert diff(before, snapshot(folder)) == {"created": [], "deleted": [], "changed": []}


@pytest.mark.parametrize("target", ["thesis.txt", "studies.db"])
def test_dashboard_out_refuses_a_file_that_is_not_a_dashboard(user_dir, tmp_path, target):
    before = snapshot(user_dir)
    proc = run("dashboard.py", ["--storage", f"sqlite:///{user_dir / 'studies.db'}",
                                "--out", str(user_dir / target)], tmp_path)
    assert_refused(proc, str(user_dir / target))
    assert diff(before, snapshot(user_dir)) == {"created": [], "deleted": [], "changed": []}


def test_pipeline_refuses_a_foreign_page_before_any_work(user_dir, tmp_path):
    (user_dir / "dashboard.html").write_text("<html>my own notes</html>")
    before = snapshot(user_dir)
    storage = tmp_path / "new.db"
    proc = run("pipeline.py", ["--storage", f"sqlite:///{storage}", "--out-dir", str(user_dir)],
               tmp_path)
    assert_refused(proc, "dashboard.html")
    assert diff(before, snapshot(user_dir)) == {"created": [], "deleted": [], "changed": []}
    assert not storage.exists()  # refused before the storage was created


# ---- the rules, on the library -----------------------------------------------------------------

def test_a_results_folder_of_ours_is_replaced_whole(tmp_path):
    out = tmp_path / "final"
    publish_dir(out, lambda d: (d / "metrics.json").write_text("{}"))
    assert json.loads((out / MANIFEST).read_text())["files"] == ["metrics.json"]
    publish_dir(out, lambda d: (d / "config.json").write_text("{}"))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "config.json"]


def test_a_file_the_user_added_to_a_results_folder_is_never_deleted(tmp_path):
    out = tmp_path / "final"
    publish_dir(out, lambda d: (d / "metrics.json").write_text("{}"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="notes.txt"):
        publish_dir(out, lambda d: (d / "metrics.json").write_text("{}"))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_results_folder_of_an_earlier_release_is_adopted(tmp_path):
    out = tmp_path / "final"  # what earlier releases wrote: no manifest
    out.mkdir()
    for name in ("metrics.json", "config.json", "history_seed0.json", "params_seed0.npz",
                 "accuracy.png", "lr.png"):
        (out / name).write_text("old")
    check_results_dir(out)
    publish_dir(out, lambda d: (d / "metrics.json").write_text("new"))
    assert (out / "metrics.json").read_text() == "new"
    assert not (out / "lr.png").exists()
    (out / "thesis.txt").write_text("mine")
    (out / "config.json").write_text("old")
    with pytest.raises(InputError, match="thesis.txt"):
        check_results_dir(out)  # the manifest does not list it: refused


def test_a_foreign_folder_with_result_like_names_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # but no config.json, no manifest: not ours
    with pytest.raises(InputError, match="not a results folder"):
        check_results_dir(out)
    (out / MANIFEST).write_text('{"tool": "someone else", "files": []}')
    with pytest.raises(InputError, match="not a results folder"):
        check_results_dir(out)


def test_an_output_may_not_be_or_contain_the_storage(tmp_path):
    db = tmp_path / "s" / "studies.db"
    with pytest.raises(InputError, match="storage"):
        check_results_dir(tmp_path / "s", protect=[db])  # does not exist yet: still refused
    with pytest.raises(InputError, match="storage"):
        check_page(db, protect=[db])


def test_a_folder_that_became_foreign_during_the_run_is_left_alone(tmp_path):
    out = tmp_path / "final"

    def write(folder):
        (folder / "metrics.json").write_text("{}")
        out.mkdir()
        (out / "thesis.txt").write_text("mine")  # the user wrote here while we trained
    with pytest.raises(InputError, match="saved to"):
        publish_dir(out, write)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("final-")]
    assert len(aside) == 1 and (aside[0] / "metrics.json").is_file()  # the results are kept


def test_pages_of_ours_are_replaced_and_others_refused(tmp_path):
    legacy = tmp_path / "old.html"  # an earlier release's page: no generator tag, its title
    legacy.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>λ search — c"
                      "</title></head></html>", encoding="utf-8")
    save_page(legacy, f"<html><head>{PAGE_TAG}</head></html>")
    assert is_page(legacy) and PAGE_TAG in legacy.read_text()
    other = tmp_path / "notes.html"
    other.write_text("<html><title>my notes</title></html>")
    with pytest.raises(InputError, match="not a dashboard page"):
        save_page(other, "<html></html>")
    assert other.read_text() == "<html><title>my notes</title></html>"


def test_temporaries_of_a_killed_run_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    left = [tmp_path / f".final.tmp-p{dead_pid}-abc", tmp_path / ".final.tmp-x7y2k9q1",  # release 1
            tmp_path / f".final.old-p{dead_pid}-def"]
    for d in left:
        (d / "final").mkdir(parents=True)
    live = tmp_path / f".final.tmp-p{os.getppid()}-ghi"  # a live process's: never touched
    live.mkdir()
    stale_file = tmp_path / f".dashboard.html.tmp-p{dead_pid}-jkl"
    stale_file.write_text("half")
    unrelated = tmp_path / ".finalists.tmp-p1-x"
    unrelated.mkdir()
    publish_dir(tmp_path / "final", lambda d: (d / "metrics.json").write_text("{}"))
    clean_stale(tmp_path / "dashboard.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, unrelated.name, "final"])


@pytest.mark.parametrize("kind", ["text", "other-app"])
def test_a_storage_path_holding_another_file_is_never_written(tmp_path, cifar_tiny_dir, kind):
    target = tmp_path / "app.db"
    if kind == "text":
        target.write_text("my notes\n")
    else:  # another program's SQLite database: Optuna's tables and WAL mode must not be added
        with sqlite3.connect(target) as db:
            db.execute("create table customers (name)")
    before = snapshot(tmp_path)
    proc = run("search.py", ["coarse", "--storage", f"sqlite:///{target}", "--data-dir",
                             str(cifar_tiny_dir.batches), *TINY, "--n-trials", "1"], tmp_path)
    assert_refused(proc, str(target))
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("_cache")} == before


def test_the_array_cache_deletes_only_its_own_stale_entries(cifar_tiny_dir, tmp_path):
    from clr_lambda_search.model.dataset import load_cifar10

    cache = tmp_path / "cache"  # $CIFAR10_CACHE may be a folder that holds a user's things
    mine = cache / "arrays" / "project"
    mine.mkdir(parents=True)
    (mine / "spec.json").write_text(json.dumps({"folder": str(tmp_path / "gone"), "n_val": 1}))
    (mine / "data.csv").write_text("a,b\n")
    load_cifar10(cifar_tiny_dir.batches, n_val=20, cache_dir=cache)
    assert (mine / "data.csv").read_text() == "a,b\n"
    assert len([p for p in (cache / "arrays").iterdir() if p.name != "project"]) == 1


@pytest.mark.parametrize("name", ["../../outside", "a/b", "..", "-x"])
def test_a_campaign_name_cannot_lead_outputs_out_of_studies(tmp_path, name):
    proc = run("dashboard.py", ["--campaign", name, "--storage", f"sqlite:///{tmp_path / 's.db'}"],
               tmp_path)
    assert_refused(proc, "--campaign")
    proc = run("pipeline.py", ["--campaign", name, "--storage", f"sqlite:///{tmp_path / 's.db'}"],
               tmp_path)
    assert_refused(proc, "--campaign")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

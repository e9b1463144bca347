"""Bad input on every script: exit 2, exactly one "error:" line on stderr, nothing written.

Table-driven: each case runs one script as a user would (a subprocess, cwd = the repo root) with
every storage and output path pointing into its own case folder, which holds a copy of a valid
campaign's SQLite storage (prepared once per module by `scripts/search.py coarse` on the tiny
CIFAR-10), an existing output folder and a regular file. The case folder is snapshotted (path,
kind, size, mtime_ns, permissions, and the sha256 of every file, the storage included) before
and after the run: bad input must leave it exactly as it was.

All cases of the module run in one fixture, MAX_PARALLEL processes at a time: the module costs
about (number of cases × ~1.3 s of imports) / cores, some 30-40 s on two idle cores.

Unreadable data (chmod 000) does not stop root; when the tests run as root, those cases run the
script with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (still uid 0, owner of the files),
so permissions apply as for any user; where that is impossible they are skipped, and the
root-proof case train-batch-is-a-folder still covers an unreadable batch.

Known bugs are marked xfail(strict=True) with the culprit in the reason: they fail today, and
strict mode reports the day one is fixed.
"""
import contextlib
import dataclasses
import hashlib
import os
import pickle
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from envlib import limited
from test_space import BAD

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = "cli"  # the valid campaign every case's storage copy holds (coarse study, 3 trials)
PASSWORD = "secret"  # in the unreachable-storage URL: must never be printed
PG_URL = f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:1/db"  # port 1: connection refused
MAX_PARALLEL = 4
CASE_TIMEOUT = 180  # seconds; a buggy case that trains instead of failing stays tiny anyway
MEMORY_LIMIT = 3 << 30  # a script on the tiny data set needs well under 2 GB of address space

# Tiny settings, so that a case which wrongly runs (a bug) still finishes in seconds.
TRAIN = ["--n-val", "20", "--n-s", "5", "--cycles", "1"]
SEARCH = ["--n-val", "20", "--n-trials", "1", "--n-s", "5", "--cycles", "1", "--n-batch", "20",
          "--pruner", "none"]
FINAL = ["--n-val", "20", "--seeds", "1", "--n-s", "5", "--cycles", "1"]
PIPELINE = ["--n-val", "20", "--coarse-trials", "3", "--fine-trials", "3", "--search-n-s", "5",
            "--search-cycles", "1", "--final-n-s", "5", "--final-cycles", "1", "--seeds", "1",
            "--workers", "1", "--pruner", "none"]


# A bad campaign file per case of tests/test_space.py, and what its error must start with.
BAD_CAMPAIGNS = {**BAD, "valid-one-phase": (
    '[[phases]]\nname = "only"\nparams.lam = {low = 1e-5, high = 1e-1, log = true}\n', "")}
CAMPAIGN_NEEDLES = {name: ("malformed TOML" if name in ("malformed", "duplicated-param") else needle)
                    for name, (_, needle) in BAD.items()}


class OneLineViolation(AssertionError):
    """stderr is not exactly one line (everything else about the case was right)."""


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple         # placeholders: {data} {archive} {db} {case} {out} {file} {bad}
    needle: str         # the error must contain this (names the problem); placeholders too
    setup: str = None   # how to build {bad}: see make_bad_data
    env: tuple = ()     # extra environment variables
    unprivileged: bool = False  # needs file permissions to apply (root: drop DAC capabilities)
    cache_in_case: bool = False  # put $CIFAR10_CACHE inside the snapshotted case folder
    memory_limit: bool = False  # cap the address space (MEMORY_LIMIT): a regression that
                                # allocates gigabytes fails with MemoryError instead of swapping


def case(id, script, args, needle, marks=(), **kw):
    return pytest.param(Case(id, script, tuple(args), needle, **kw), id=id, marks=marks)


def bug(reason):
    return pytest.mark.xfail(strict=True, reason="BUG: " + reason)


CASES = [
    # ---- data: missing, empty, unreadable, truncated, corrupt, wrong checksum, hostile --------
    case("gradcheck-data-dir-missing", "gradcheck.py",
         ["--data-dir", "{case}/no-such-dir", "--n-val", "20"], "{case}/no-such-dir"),
    case("train-data-dir-empty", "train.py",
         ["--data-dir", "{bad}", *TRAIN, "--out", "{out}/run"], "{bad}", setup="empty",
         cache_in_case=True),
    case("train-data-dir-unreadable", "train.py",
         ["--data-dir", "{bad}", *TRAIN, "--out", "{out}/run"], "cifar-10-batches-py",
         setup="unreadable-dir", unprivileged=True, cache_in_case=True),
    case("train-batch-unreadable", "train.py",
         ["--data-dir", "{bad}", *TRAIN, "--out", "{out}/run"], "data_batch_2",
         setup="unreadable-batch", unprivileged=True, cache_in_case=True),
    # root reads chmod-000 files: this unreadable batch stops root too
    case("train-batch-is-a-folder", "train.py",
         ["--data-dir", "{bad}", *TRAIN, "--out", "{out}/run"], "test_batch",
         setup="batch-is-a-folder", cache_in_case=True),
    case("search-coarse-batch-truncated", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{bad}", *SEARCH],
         "data_batch_1", setup="truncated", cache_in_case=True),
    case("final-batch-random-bytes", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{bad}", *FINAL,
          "--out", "{out}/final"], "data_batch_3", setup="random-bytes", cache_in_case=True),
    case("pipeline-archive-wrong-md5", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{archive}", *PIPELINE,
          "--out-dir", "{out}/campaign"], "checksum", env=(("CIFAR10_MD5", "0" * 32),),
         cache_in_case=True),
    case("train-pickle-runs-code", "train.py",
         ["--data-dir", "{bad}", *TRAIN, "--out", "{out}/run"], "data_batch_1",
         setup="pickle-runs-code", cache_in_case=True),
    # ---- λ, its range, and the training settings ---------------------------------------------
    case("train-lam-negative", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--lam", "-1", "--out", "{out}/run"], "lam"),
    case("final-lam-negative", "final.py",
         ["--storage", "{db}", "--data-dir", "{data}", *FINAL, "--lam", "-1",
          "--out", "{out}/final"], "lam"),
    case("search-coarse-low-above-high", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--low", "1e-2", "--high", "1e-3"], "low"),
    case("search-coarse-low-zero", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--low", "0"], "low"),
    case("search-coarse-low-negative", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--low", "-1"], "low"),
    case("search-coarse-n-trials-zero", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--n-trials", "0"], "--n-trials"),
    case("pipeline-coarse-trials-zero", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--coarse-trials", "0", "--out-dir", "{out}/campaign"], "--coarse-trials"),
    case("search-coarse-n-s-zero", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--n-s", "0"], "n_s"),
    case("train-n-s-zero", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--n-s", "0", "--out", "{out}/run"], "n_s"),
    case("final-n-s-zero", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL, "--n-s", "0",
          "--out", "{out}/final"], "n"),
    case("pipeline-search-n-s-zero", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--search-n-s", "0", "--out-dir", "{out}/campaign"], "n_s"),
    case("pipeline-final-n-s-zero", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--final-n-s", "0", "--out-dir", "{out}/campaign"], "n_s"),
    case("search-coarse-cycles-zero", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--cycles", "0"], "cycles"),
    case("final-cycles-zero", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL, "--cycles", "0",
          "--out", "{out}/final"], "cycles"),
    case("train-eta-min-above-eta-max", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--eta-min", "0.2", "--eta-max", "0.1",
          "--out", "{out}/run"], "eta"),
    case("train-dtype-unknown", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--dtype", "float16", "--out", "{out}/run"], "float16"),
    # ---- campaigns and phases ----------------------------------------------------------------
    case("status-unknown-campaign", "search.py",
         ["status", "--campaign", "nope", "--storage", "{db}"], "nope"),
    case("final-unknown-campaign", "final.py",
         ["--campaign", "nope", "--storage", "{db}", "--data-dir", "{data}", *FINAL,
          "--out", "{out}/final"], "nope"),
    case("dashboard-unknown-campaign", "dashboard.py",
         ["--campaign", "nope", "--storage", "{db}", "--out", "{out}/dashboard.html",
          "--final-dir", "{out}/final"], "nope"),
    case("fine-without-coarse", "search.py",
         ["fine", "--campaign", "other", "--storage", "{db}", "--data-dir", "{data}", *SEARCH],
         "other"),
    case("fine-values-not-numbers", "search.py",
         ["fine", "--campaign", CAMPAIGN, "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--values", "a,b"], "--values"),
    case("fine-values-negative", "search.py",
         ["fine", "--campaign", CAMPAIGN, "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--values=-1,2"], "--values"),
    case("fine-values-empty-list", "search.py",
         ["fine", "--campaign", CAMPAIGN, "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--values", ","], "--values"),
    case("search-unknown-phase", "search.py", ["bogus", "--storage", "{db}"], "bogus"),
    case("pipeline-config-missing", "pipeline.py",
         ["--config", "{case}/none.toml", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--out-dir", "{out}/campaign"], "{case}/none.toml"),
    case("search-values-on-a-phase-with-four-params", "search.py",
         ["coarse", "--config", "example", "--campaign", "fresh", "--storage", "{db}",
          "--data-dir", "{data}", *SEARCH, "--values", "1e-3,1e-2"], "--values"),
    case("pipeline-phase-flag-not-in-campaign", "pipeline.py",
         ["--config", "{bad}", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--out-dir", "{out}/campaign"], "--coarse-trials", setup="campaign-valid-one-phase"),
    *[case(f"pipeline-campaign-{name}", "pipeline.py",
           ["--config", "{bad}", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
            "--out-dir", "{out}/campaign"], "{bad}: " + needle, setup=f"campaign-{name}")
      for name, needle in CAMPAIGN_NEEDLES.items()],
    # ---- storage -------------------------------------------------------------------------------
    case("status-storage-malformed-url", "search.py",
         ["status", "--campaign", CAMPAIGN, "--storage", "notaurl://"], "notaurl"),
    case("status-storage-unreachable", "search.py",
         ["status", "--campaign", CAMPAIGN, "--storage", PG_URL], "127.0.0.1"),
    case("final-storage-unreachable", "final.py",
         ["--campaign", CAMPAIGN, "--storage", PG_URL, "--data-dir", "{data}", *FINAL,
          "--out", "{out}/final"], "127.0.0.1"),
    case("search-coarse-storage-unreachable", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", PG_URL, "--data-dir", "{data}", *SEARCH],
         "127.0.0.1"),
    case("search-coarse-sqlite-folder-missing", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "sqlite:///{case}/missing/s.db",
          "--data-dir", "{data}", *SEARCH], "{case}/missing"),
    case("status-sqlite-folder-missing", "search.py",
         ["status", "--campaign", CAMPAIGN, "--storage", "sqlite:///{case}/missing/s.db"],
         "{case}/missing"),
    # ---- output paths --------------------------------------------------------------------------
    case("train-out-is-a-file", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--out", "{file}"], "{file}"),
    case("final-out-is-a-file", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL,
          "--out", "{file}"], "{file}"),
    case("dashboard-out-is-a-folder", "dashboard.py",
         ["--campaign", CAMPAIGN, "--storage", "{db}", "--out", "{out}",
          "--final-dir", "{out}/final"], "folder"),
    # ---- counts --------------------------------------------------------------------------------
    case("final-seeds-zero", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL, "--seeds", "0",
          "--out", "{out}/final"], "--seeds"),
    case("final-workers-zero", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL, "--workers", "0",
          "--out", "{out}/final"], "--workers"),
    case("pipeline-seeds-zero", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--seeds", "0", "--out-dir", "{out}/campaign"], "--seeds"),
    case("search-workers-zero", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--workers", "0"], "--workers"),
    case("pipeline-workers-zero", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--workers", "0", "--out-dir", "{out}/campaign"], "--workers"),
    # ---- bounds and resources (issue 15): refused before anything is allocated or written ------
    case("search-coarse-seed-negative", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--seed", "-1"], "--seed"),
    case("search-coarse-seed-2-32", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--seed", "4294967296"], "--seed"),
    case("search-coarse-train-seed-2-32", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--train-seed", "4294967296"], "--train-seed"),
    case("pipeline-seed-2-32", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--seed", "4294967296", "--out-dir", "{out}/campaign"], "--seed"),
    case("train-seed-2-32", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--seed", "4294967296", "--out", "{out}/run"], "seed"),
    case("final-last-seed-past-2-32", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL, "--seeds", "2",
          "--seed", "4294967295", "--out", "{out}/final"], "--seed"),
    case("gradcheck-seed-negative", "gradcheck.py",
         ["--data-dir", "{data}", "--n-val", "20", "--seed", "-1"], "--seed"),
    case("search-coarse-high-inf", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--high", "inf"], "--high"),
    case("search-coarse-low-nan", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--low", "nan"], "--low"),
    case("gradcheck-tol-nan", "gradcheck.py",
         ["--data-dir", "{data}", "--n-val", "20", "--tol", "nan"], "--tol"),
    case("train-m-huge", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--m", "1000000000", "--out", "{out}/run"], "memory",
         memory_limit=True),
    case("train-n-batch-huge", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--n-batch", "1000000000", "--out", "{out}/run"],
         "memory", memory_limit=True),
    case("train-cycles-huge", "train.py",
         ["--data-dir", "{data}", "--n-val", "20", "--n-s", "5", "--evals-per-cycle", "2",
          "--cycles", "1000000000", "--out", "{out}/run"], "memory", memory_limit=True),
    case("search-coarse-m-huge", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--m", "1000000000"], "memory", memory_limit=True),
    case("fine-n-batch-huge", "search.py",
         ["fine", "--campaign", CAMPAIGN, "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--n-batch", "1000000000"], "memory", memory_limit=True),
    case("final-m-huge", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL, "--m",
          "1000000000", "--out", "{out}/final"], "memory", memory_limit=True),
    case("gradcheck-m-huge", "gradcheck.py",
         ["--data-dir", "{data}", "--n-val", "20", "--m", "1000000000"], "--m",
         memory_limit=True),
    case("train-evals-per-cycle-huge", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--evals-per-cycle", "300000000", "--out", "{out}/run"],
         "evals_per_cycle", memory_limit=True),
    case("search-coarse-evals-per-cycle-huge", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--evals-per-cycle", "300000000"], "evals_per_cycle", memory_limit=True),
    case("search-coarse-repeats-huge", "search.py",
         ["coarse", "--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *SEARCH,
          "--repeats", "1000000000"], "--repeats", memory_limit=True),
    case("fine-values-n-trials-mismatch", "search.py",
         ["fine", "--campaign", CAMPAIGN, "--storage", "{db}", "--data-dir", "{data}",
          *SEARCH[:2], *SEARCH[4:],  # SEARCH without its --n-trials
          "--values", "1e-3,2e-3", "--n-trials", "4"], "--n-trials"),
    case("train-batch-declares-3-gb", "train.py",
         ["--data-dir", "{bad}", *TRAIN, "--out", "{out}/run"],
         "data_batch_4 is corrupt (it declares",  # the declaration, not a failed allocation
         setup="declares-3-gb", cache_in_case=True, memory_limit=True),
    # ---- the environment (issue 15) ------------------------------------------------------------
    case("train-out-read-only", "train.py",
         ["--data-dir", "{data}", *TRAIN, "--out", "{bad}/run"], "{bad}/run",
         setup="read-only-dir", unprivileged=True),
    case("final-out-read-only", "final.py",
         ["--lam", "0.01", "--storage", "{db}", "--data-dir", "{data}", *FINAL,
          "--out", "{bad}/final"], "{bad}/final", setup="read-only-dir", unprivileged=True),
    case("pipeline-out-dir-read-only", "pipeline.py",
         ["--campaign", "fresh", "--storage", "{db}", "--data-dir", "{data}", *PIPELINE,
          "--out-dir", "{bad}/campaign"], "{bad}/campaign", setup="read-only-dir",
         unprivileged=True),
    case("status-foreign-sqlite", "search.py",
         ["status", "--campaign", CAMPAIGN, "--storage", "sqlite:///{bad}"], "Optuna",
         setup="foreign-db"),
    case("dashboard-foreign-sqlite", "dashboard.py",
         ["--campaign", CAMPAIGN, "--storage", "sqlite:///{bad}", "--out", "{out}/d.html",
          "--final-dir", "{out}/final"], "Optuna", setup="foreign-db"),
    case("gradcheck-data-dir-symlink-loop", "gradcheck.py",
         ["--data-dir", "{bad}", "--n-val", "20"], "symlink loop", setup="symlink-loop"),
    # ---- unknown flags, one per script ---------------------------------------------------------
    *[case(f"{script[:-3]}-unknown-flag", script, [*pre, "--no-such-flag"], "--no-such-flag")
      for script, pre in (("gradcheck.py", ["--data-dir", "{data}"]),
                          ("train.py", ["--data-dir", "{data}", "--out", "{out}/run"]),
                          ("search.py", ["status", "--storage", "{db}"]),
                          ("final.py", ["--storage", "{db}", "--out", "{out}/final"]),
                          ("dashboard.py", ["--storage", "{db}", "--out", "{out}/d.html"]),
                          ("pipeline.py", ["--storage", "{db}", "--out-dir", "{out}/c"]))],
]


# ---- the case folders --------------------------------------------------------------------------

class _Reduce:
    """Unpickles to func(*args)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _RunsCode:
    """Unpickles to os.system(command): what a hostile 'batch' would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_batch(marker):
    return pickle.dumps({b"data": _RunsCode(f"touch {marker}"), b"labels": [0]}, protocol=2)


def make_bad_data(kind, case_dir, tiny):
    """Build the broken data set of a case in case_dir/bad; return the path passed as {bad}."""
    bad = case_dir / "bad"
    if kind.startswith("campaign-"):  # a bad campaign file (tests/test_space.py: BAD)
        bad = case_dir / "bad.toml"
        bad.write_text(BAD_CAMPAIGNS[kind.removeprefix("campaign-")][0])
        return bad
    if kind == "empty":
        bad.mkdir()
        return bad
    if kind == "read-only-dir":  # chmod 555: what a read-only folder is to a user
        bad.mkdir()
        bad.chmod(0o555)
        return bad
    if kind == "foreign-db":  # another program's SQLite database
        with contextlib.closing(sqlite3.connect(case_dir / "foreign.db")) as db:
            db.execute("CREATE TABLE notes (body TEXT)")
            db.execute("INSERT INTO notes VALUES ('mine')")
            db.commit()
        return case_dir / "foreign.db"
    if kind == "symlink-loop":
        bad.symlink_to(bad)
        return bad
    batches = bad / "cifar-10-batches-py"
    shutil.copytree(tiny.batches, batches)
    if kind == "truncated":
        raw = (batches / "data_batch_1").read_bytes()
        (batches / "data_batch_1").write_bytes(raw[:len(raw) // 2])
    elif kind == "random-bytes":
        size = (batches / "data_batch_3").stat().st_size
        (batches / "data_batch_3").write_bytes(os.urandom(size))
    elif kind == "pickle-runs-code":
        (batches / "data_batch_1").write_bytes(hostile_batch(case_dir / "PWNED"))
    elif kind == "batch-is-a-folder":
        (batches / "test_batch").unlink()
        (batches / "test_batch").mkdir()
    elif kind == "unreadable-batch":
        (batches / "data_batch_2").chmod(0)
    elif kind == "unreadable-dir":
        batches.chmod(0)
    elif kind == "declares-3-gb":  # a few hundred bytes that make numpy allocate 3 GB
        from numpy._core.multiarray import _reconstruct
        (batches / "data_batch_4").write_bytes(pickle.dumps(
            {b"data": _Reduce(_reconstruct, (np.ndarray, (1_000_000, 3072), b"B")),
             b"labels": _Reduce(_reconstruct, (np.ndarray, (1_000_000,), b"<i8"))}, protocol=2))
    else:
        raise ValueError(kind)
    return batches


def snapshot(root):
    """{relative path: (kind, size, mtime_ns, mode, sha256 of a file's bytes)} of a tree.

    Walks as the test process (root reads chmod-000 entries; others record what they can).
    A folder's mtime is left out: opening a study, even to read it, makes SQLite create and then
    remove its write-ahead-log files beside the database (search.study), which leaves nothing
    behind but moves the folder's mtime; what a folder holds is compared entry by entry.
    """
    out = {}

    def visit(path):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", None, None, stat.S_IMODE(st.st_mode), None)
            try:
                children = sorted(path.iterdir())
            except PermissionError:
                return
            for child in children:
                visit(child)
        else:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digest = None
            out[rel] = ("file", st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), digest)
    visit(root)
    return out


def script_env(cache, extra=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    env["CIFAR10_CACHE"] = str(cache)
    env.update(extra)
    return env


def limits(c, root):
    """envlib.limited's keywords for case c: root's permission overrides dropped for an
    unprivileged case, the address space capped for a memory-limited one."""
    return {"drop_dac": bool(c.unprivileged and root),
            "memory": MEMORY_LIMIT if c.memory_limit else None}


def permissions_apply(tmp):
    """True when a chmod-000 file is unreadable to the scripts: not root, or root whose DAC
    capabilities can be dropped (Linux, CAP_SETPCAP)."""
    if os.geteuid() != 0:
        return True
    probe = tmp / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        proc = subprocess.run(limited([sys.executable, "-c", f"open({str(probe)!r})"],
                                      drop_dac=True),
                              capture_output=True, text=True, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        probe.unlink()
    return proc.returncode != 0 and "PermissionError" in proc.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_errors")
    yield path
    for p in path.rglob("*"):  # chmod-000 entries: readable and removable again
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture(scope="module")
def campaign_db(base, cifar_tiny_dir):
    """A valid campaign's storage: `search.py coarse` with tiny settings (3 complete trials)."""
    db = base / "campaign.db"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "search.py"), "coarse", "--campaign", CAMPAIGN,
         "--n-trials", "3", "--n-s", "10", "--cycles", "1", "--n-batch", "20", "--pruner", "none",
         "--data-dir", str(cifar_tiny_dir.batches), "--n-val", "20", "--storage", f"sqlite:///{db}",
         "-q", "--json"],
        cwd=REPO, env=script_env(base / "_cache" / "campaign"), capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr  # the baseline is valid: errors below are the cases'
    assert db.is_file()
    return db


def prepare(c, base, tiny, campaign_db):
    """The case folder (storage copy, output folder, a file, broken data) and the command."""
    case_dir = base / c.id
    case_dir.mkdir()
    shutil.copy2(campaign_db, case_dir / "s.db")
    out = case_dir / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result\n")
    (case_dir / "a-file").write_text("keep me\n")
    bad = make_bad_data(c.setup, case_dir, tiny) if c.setup else None
    subst = {"{data}": str(tiny.batches), "{archive}": str(tiny.archive),
             "{db}": f"sqlite:///{case_dir / 's.db'}", "{case}": str(case_dir), "{out}": str(out),
             "{file}": str(case_dir / "a-file"), "{bad}": str(bad)}

    def fill(arg):
        for key, value in subst.items():
            arg = arg.replace(key, value)
        return arg
    args = [fill(a) for a in c.args] + ["--json"]
    cache = case_dir / "cache" if c.cache_in_case else base / "_cache" / c.id
    env = script_env(cache, dict(c.env))
    return case_dir, [sys.executable, str(REPO / "scripts" / c.script), *args], env, fill(c.needle)


@pytest.fixture(scope="module")
def results(base, cifar_tiny_dir, campaign_db):
    """Run every case, MAX_PARALLEL at a time -> {id: dict(code, out, err, before, after, dir)}."""
    root = os.geteuid() == 0
    perms = permissions_apply(base)
    (base / "_logs").mkdir()
    pending, running, done = [], {}, {}
    for param in CASES:
        c = param.values[0]
        if c.unprivileged and not perms:
            done[c.id] = {"skip": "root, and its DAC capabilities cannot be dropped: chmod 000 "
                                  "does not stop its reads (see train-batch-is-a-folder)"}
            continue
        case_dir, cmd, env, needle = prepare(c, base, cifar_tiny_dir, campaign_db)
        pending.append((c, case_dir, cmd, env, needle))
    try:
        while pending or running:
            while pending and len(running) < MAX_PARALLEL:
                c, case_dir, cmd, env, needle = pending.pop(0)
                before = snapshot(case_dir)
                # closed once the process is reaped (below, or in the finally clause)
                logs = [open(base / "_logs" / f"{c.id}.{s}", "w+")  # noqa: SIM115
                        for s in ("out", "err")]
                # a session of its own: a timed-out case is killed with all it forked
                proc = subprocess.Popen(limited(cmd, **limits(c, root)), cwd=REPO, env=env,
                                        stdout=logs[0], stderr=logs[1], text=True,
                                        start_new_session=True)
                running[c.id] = (proc, logs, case_dir, before, time.monotonic(), needle)
            time.sleep(0.05)
            for cid, (proc, logs, case_dir, before, t0, needle) in list(running.items()):
                if proc.poll() is None and time.monotonic() - t0 < CASE_TIMEOUT:
                    continue
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                out, err = [(f.seek(0), f.read())[1] for f in logs]
                for f in logs:
                    f.close()
                done[cid] = {"code": proc.returncode, "out": out, "err": err, "dir": case_dir,
                             "seconds": time.monotonic() - t0, "needle": needle,
                             "before": before, "after": snapshot(case_dir)}
                del running[cid]
    finally:  # stop the processes this fixture started, and only those
        for proc, logs, *_ in running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for f in logs:
                f.close()
    return done


def diff(before, after):
    changed = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    return {"created": sorted(after.keys() - before.keys()),
            "deleted": sorted(before.keys() - after.keys()), "changed": sorted(changed)}


def test_enough_cases():
    # the brief asks for at least 24 cases, every script among them
    assert len(CASES) >= 24
    assert {p.values[0].script for p in CASES} == {
        "gradcheck.py", "train.py", "search.py", "final.py", "dashboard.py", "pipeline.py"}
    assert len({p.values[0].id for p in CASES}) == len(CASES)  # unique pytest ids


@pytest.mark.parametrize("c", CASES)
def test_bad_input(results, c):
    r = results[c.id]
    if "skip" in r:
        pytest.skip(r["skip"])
    err = r["err"]
    # the bad-input exit status (1 would be a crash or a runtime failure, 0 a silent default)
    assert r["code"] == 2, f"exit {r['code']} after {r['seconds']:.1f} s\n{err[-3000:]}"
    assert "Traceback" not in err  # a message for the user, not a stack
    assert "error" in err.lower(), err
    assert r["needle"].lower() in err.lower(), f"the error should name {r['needle']!r}: {err}"
    assert PASSWORD not in err + r["out"]  # a storage password is never printed
    assert r["out"] == ""  # no JSON object or text result for a failed run, even with --json
    # nothing written: the storage copy (sha256 of its bytes), the output folder, the file and
    # every other entry of the case folder are exactly as before (size, mtime_ns, mode, bytes)
    changes = diff(r["before"], r["after"])
    assert changes == {"created": [], "deleted": [], "changed": []}, changes
    if c.setup == "pickle-runs-code":
        # the hostile pickle's os.system never ran (the snapshot would show it too)
        assert not (r["dir"] / "PWNED").exists()
    lines = err.splitlines()
    if not (len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip()):
        raise OneLineViolation(f"stderr is not exactly one 'error: ...' line:\n{err}")


def test_hostile_payload_is_live(tmp_path):
    # control for the pickle case: the payload really runs code when unpickled without care,
    # so the marker's absence above proves the loader refused it, not that the payload is inert
    marker = tmp_path / "ran"
    pickle.loads(hostile_batch(marker))  # our own payload, on purpose
    assert marker.exists()


def test_snapshot_sees_changes(tmp_path):
    # control for the snapshot: a rewrite with the same size, a new file and a chmod all show up
    (tmp_path / "s.db").write_bytes(b"abcd")
    before = snapshot(tmp_path)
    (tmp_path / "s.db").write_bytes(b"abce")
    os.utime(tmp_path / "s.db", ns=(0, before["s.db"][2]))  # same mtime: only the hash differs
    assert diff(before, snapshot(tmp_path))["changed"] == ["s.db"]
    (tmp_path / "new").mkdir()
    assert "new" in diff(before, snapshot(tmp_path))["created"]


# ---- forks and numbers without bound (issue 15): parsed in-process (a regression forks nothing) -

def load_script(name):
    """The code of scripts/<name>.py, search.cli.<name>, as a module (its main() is not run)."""
    import importlib
    return importlib.import_module(f"clr_lambda_search.search.cli.{name}")


@pytest.mark.parametrize("script, argv, flag, control", [
    ("search", ["coarse", "--workers", "10000"], "--workers", ["coarse", "--workers", "2"]),
    ("pipeline", ["--workers", "10000"], "--workers", ["--workers", "2"]),
    ("final", ["--workers", "10000"], "--workers", ["--workers", "2"]),
    # every seed forks at once
    ("final", ["--seeds", "10000", "--workers", "2"], "--seeds",
     ["--seeds", "3", "--workers", "2"]),
    ("pipeline", ["--seeds", "10000", "--workers", "2"], "--seeds",
     ["--seeds", "3", "--workers", "2"]),
    # numbers without bound: a regression overflows, or sleeps for ages
    ("search", ["coarse", "--grace-period", "100000000000000"], "--grace-period",
     ["coarse", "--grace-period", "604800"]),
    ("search", ["coarse", "--heartbeat-interval", "1000000000000", "--grace-period",
                "2000000000000"], "--heartbeat-interval",
     ["coarse", "--heartbeat-interval", "3600", "--grace-period", "604800"]),
    ("search", ["fine", "--margin", "1e308"], "--margin", ["fine", "--margin", "100"]),
    ("bench", ["--seed", "-1"], "--seed", ["--seed", "0"]),
    ("bench", ["--seed", str(2 ** 32)], "--seed", ["--seed", str(2 ** 32 - 1)]),
    ("train", ["--threads", str(10 ** 20)], "--threads", ["--threads", "1"]),
])
def test_unbounded_flags_are_refused_by_the_parser(script, argv, flag, control, capsys):
    parse_args = load_script(script).parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err, err
    parse_args(control)  # control: within the bound, accepted


def test_a_campaign_margin_without_bound_is_refused():
    from clr_lambda_search.model.errors import ConfigError
    from clr_lambda_search.search.campaign import parse_campaign

    phases = [{"name": "coarse", "params": {"lam": {"low": 1e-5, "high": 1e-1, "log": True}}},
              {"name": "fine", "narrow": {"from": "coarse", "margin": 1e308}}]
    with pytest.raises(ConfigError, match="margin"):
        parse_campaign({"phases": phases})
    phases[1]["narrow"]["margin"] = 100
    parse_campaign({"phases": phases})  # control

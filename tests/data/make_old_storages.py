"""Regenerate the old-storage fixtures of tests/data/ (see README.md there) with the code of the
checkout this file is in. Run from the repository root, with that checkout on PYTHONPATH:

    PYTHONPATH=. python tests/data/make_old_storages.py tests/data            # 03d5f40's
    PYTHONPATH=. python tests/data/make_old_storages.py --release tests/data  # a release's

- old-complete.db: the tiny campaign "old" run to its end by one pipeline.py.
- old-fine-interrupted.db: the same command, SIGKILLed 0.05 s into the fine phase's second trial
  (coarse complete, fine 1 COMPLETE trial + the killed one left RUNNING, no confirm or final).

The command is tests/old_storage.py's PIPELINE_FLAGS on the tiny CIFAR-10 of conftest.py
(written to a temporary folder). The files are checkpointed, switched back to the rollback
journal and vacuumed: one self-contained file each, no -wal or -shm beside it.

--release: release-<RELEASE>.tar.xz, the storage and the results folder of the same campaign
with m = 2 (old_storage.RELEASE_FLAGS) run to its end, without its dashboard.html (5 MB of
plotly, written again by any dashboard command); figures saved at 16 dpi with SVG text as text
(a matplotlibrc), which only makes them small.
"""
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/

import faultlib as fl  # noqa: E402
from conftest import write_tiny_cifar  # noqa: E402
from old_storage import (CAMPAIGN, COMPLETE_DB, INTERRUPTED_DB, RELEASE_ARCHIVE,  # noqa: E402
                         RELEASE_DB, RELEASE_FLAGS, RELEASE_RESULTS, pack_release,
                         pipeline_command)


def compact(db):
    """One self-contained file: WAL checkpointed into it, rollback journal, vacuumed."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("VACUUM")
    finally:
        conn.close()
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{db}{suffix}").exists(), f"{db}{suffix} left beside the file"


def main(dest):
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_tiny_cifar(tmp / "data").batches
        env = fl.script_env(tmp)

        db = dest / COMPLETE_DB
        db.unlink(missing_ok=True)
        proc = subprocess.run(pipeline_command(fl.sqlite_url(db), data, tmp / "out-complete"),
                              cwd=fl.REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        json.loads(proc.stdout)
        compact(db)

        db = dest / INTERRUPTED_DB
        db.unlink(missing_ok=True)
        url, fine = fl.sqlite_url(db), f"{CAMPAIGN}-fine"
        victim = subprocess.Popen(pipeline_command(url, data, tmp / "out-interrupted"),
                                  cwd=fl.REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            def second_fine_trial_running():  # 1 COMPLETE, and the next one RUNNING
                states = fl.poll_trials(url, fine)
                return (list(states.values()).count("COMPLETE") == 1
                        and "RUNNING" in states.values())
            deadline = time.monotonic() + 300
            while not second_fine_trial_running():
                assert victim.poll() is None, victim.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "fine never ran its second trial"
                time.sleep(0.01)
            time.sleep(0.05)  # into the trial (~0.1 s): its λ drawn, its training under way
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.communicate()
        compact(db)
        trials, _ = fl.load_trials(url, fine)
        print(json.dumps({"fine_trials": [(t.number, t.state.name, t.params) for t in trials]}))


def release(dest):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_tiny_cifar(tmp / "data").batches
        env = fl.script_env(tmp)
        (tmp / "mpl").mkdir()
        (tmp / "mpl" / "matplotlibrc").write_text("savefig.dpi: 16\nsvg.fonttype: none\n")
        env["MATPLOTLIBRC"] = str(tmp / "mpl")
        made = tmp / "release"
        made.mkdir()
        db, results = made / RELEASE_DB, made / RELEASE_RESULTS
        proc = subprocess.run(pipeline_command(fl.sqlite_url(db), data, results, RELEASE_FLAGS),
                              cwd=fl.REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        json.loads(proc.stdout)
        compact(db)
        (results / "dashboard.html").unlink()
        pack_release(made, Path(dest) / RELEASE_ARCHIVE)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--release":
        release(sys.argv[2])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)

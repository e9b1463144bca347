"""The old-storage fixtures of tests/data/: their names and the pipeline command that made them
(tests/data/make_old_storages.py) and that test_old_storage.py runs again to resume them."""
import lzma
import sys
import tarfile

import faultlib as fl

CAMPAIGN = "old"
COMPLETE_DB = "old-complete.db"
INTERRUPTED_DB = "old-fine-interrupted.db"
N_COARSE, N_FINE, N_SEEDS = 4, 3, 2
# The shipped dd2424 campaign made tiny (runnerlib.TINY_PIPELINE's settings), on the tiny CIFAR-10
# of conftest.write_tiny_cifar with --n-val 20.
PIPELINE_FLAGS = ["--campaign", CAMPAIGN, "--coarse-trials", N_COARSE, "--fine-trials", N_FINE,
                  "--search-n-s", 20, "--search-cycles", 1, "--final-n-s", 20,
                  "--final-cycles", 1, "--seeds", N_SEEDS, "--n-val", 20, "--pruner", "none",
                  "--workers", 1, "--json"]


# Release 0.1.0 (commit d0433e3): the same tiny campaign with m = 2 hidden units (the kept
# weights stay small), finished, with its results folder; one archive of a storage and a folder.
RELEASE = "0.1.0"
RELEASE_ARCHIVE = f"release-{RELEASE}.tar.xz"
RELEASE_DB, RELEASE_RESULTS = "studies.db", "results"
RELEASE_FLAGS = [*PIPELINE_FLAGS, "--set", "config.m=2"]


def pipeline_command(storage, data_dir, out_dir, flags=PIPELINE_FLAGS):
    return [sys.executable, str(fl.REPO / "scripts" / "pipeline.py"), "--storage", storage,
            "--data-dir", str(data_dir), "--out-dir", str(out_dir), *map(str, flags)]


def pack_release(folder, archive):
    """folder's storage and results folder as one .tar.xz (xz: the results folder's figures are
    also its artifacts, the same bytes twice, which xz's window stores once)."""
    with tarfile.open(archive, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for name in (RELEASE_DB, RELEASE_RESULTS):
            tar.add(folder / name, arcname=name)


def unpack_release(archive, folder):
    """The release archive's storage and results folder, in folder."""
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder / RELEASE_DB, folder / RELEASE_RESULTS

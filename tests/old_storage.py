"""The old-storage fixtures of tests/data/: their names and the pipeline command that made them
(tests/data/make_old_storages.py) and that test_old_storage.py runs again to resume them."""
import sys

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


def pipeline_command(storage, data_dir, out_dir):
    return [sys.executable, str(fl.REPO / "scripts" / "pipeline.py"), "--storage", storage,
            "--data-dir", str(data_dir), "--out-dir", str(out_dir), *map(str, PIPELINE_FLAGS)]

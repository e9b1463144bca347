"""The digests of tests/test_golden.py's cases, computed by commit 22bc386's own code.

    git worktree add /tmp/golden22 22bc386
    OPENBLAS_CORETYPE=Haswell .venv/bin/python tests/data/golden_22bc386.py /tmp/golden22

prints the BLAS key and one line per case, to paste into test_golden.GOLDEN (drop
OPENBLAS_CORETYPE for this CPU's own kernels). Only CASES and the digest come from this tree;
the training and the data preparation are the old commit's (its model/ and tests/conftest.py).
"""
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

OLD = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(OLD), str(OLD / "tests"), str(Path(__file__).resolve().parent.parent)]
from conftest import make_split                                       # noqa: E402  (the old one)
from model.data import Dataset, split_and_normalise                   # noqa: E402
from model.train import TrainConfig, fit                              # noqa: E402
from test_golden import CASES, N_STEPS, params_digest                 # noqa: E402


def data(kind, dtype):
    r = np.random.default_rng(1 if kind == "gaussian" else 42)  # as conftest / test_golden
    if kind == "gaussian":
        return Dataset(train=make_split(r, 53, 20, 10), val=make_split(r, 17, 20, 10),
                       test=make_split(r, 19, 20, 10), source="synthetic")
    X_all = r.integers(0, 256, (530 + 40, 3072), dtype=np.uint8)
    y_all = r.integers(0, 10, 530 + 40)
    X_test, y_test = r.integers(0, 256, (20, 3072), dtype=np.uint8), r.integers(0, 10, 20)
    return split_and_normalise(X_all, y_all, X_test, y_test, 40, dtype, "generated")


print([(lib.get("architecture"), lib.get("version")) for lib in threadpool_info()
       if lib.get("internal_api") == "openblas"])
for case_id, (fields, kind) in CASES.items():
    config = TrainConfig(**{"n_s": N_STEPS // 2, "cycles": 1, "evals_per_cycle": 2,
                            "eval_train_samples": 100, "seed": 7, **fields})
    with threadpool_limits(limits=1, user_api="blas"):
        params, _ = fit(data(kind, fields["dtype"]), config)
    print(f'        "{case_id}": "{params_digest(params)}",')

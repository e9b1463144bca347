"""The base protocol stays bit-identical: sha256 digests of the params after 50 training steps.

The digests were recorded with the step as it was before dropout and augmentation existed
(commit 22bc386), on generated data: uint8 pixels of CIFAR-10's row length (so the batch gather
normalises pixels, as on the real data) and, for the other gather path, the tiny Gaussian set.
Any change to what the base protocol computes or draws from the run's rng (one more random
number per step shifts every later shuffle) changes a digest.

Bit-level results depend on the BLAS kernels (OpenBLAS picks them per CPU family) and its
version, so the digests are keyed by both; on a machine with no recorded key the test is
skipped and prints the digests it got, to be recorded from a checkout of that commit. They also
depend on the BLAS thread count (with two threads OpenBLAS splits some products differently:
f64-m300-batch64 changes), so the runs are pinned to one thread, as training is.
"""
import hashlib

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from clr_lambda_search.model import blas
from clr_lambda_search.model.dataset import split_and_normalise
from clr_lambda_search.model.network import PARAM_KEYS
from clr_lambda_search.model.train import TrainConfig, fit

N_STEPS = 50
CASES = {  # id: (TrainConfig fields, data)
    "f32-m50": (dict(dtype="float32", m=50, lam=1e-3), "pixels"),
    "f64-m50": (dict(dtype="float64", m=50, lam=1e-3), "pixels"),
    "f32-m1024": (dict(dtype="float32", m=1024, lam=2e-4, eta_max=0.05), "pixels"),
    "f64-m300-batch64": (dict(dtype="float64", m=300, n_batch=64, lam=5e-3), "pixels"),
    "f64-m10-gaussian": (dict(dtype="float64", m=10, n_batch=10, lam=0.01), "gaussian"),
}
GOLDEN = {  # (OpenBLAS architecture, version) -> {case id: sha256 of the params}
    ("SkylakeX", "0.3.31.188.0"): {  # NumPy 2.4's wheel on this project's 2-core AMD EPYC
        "f32-m50": "5b11e68dc9fbb526963ef3d1f8bd50424b1249a6e76d02ccce90aefa8b1e1ae0",
        "f64-m50": "652f52bf7c05130e9636c656e25b1dd876c0c35b90abe1bcce11ed5057dc2d9b",
        "f32-m1024": "e70e031918708304865a1a3d9cf966214d0d167d8162570155e92363775f829d",
        "f64-m300-batch64": "2ff26e6154a6cf4540b469afe95b18104929a61acd7cc2e3de62def02286b81f",
        "f64-m10-gaussian": "9f4eb27a560bd33698b88af00798f2b540a87ee89966fa959e631b61b6f2a262",
    },
}


def blas_key():
    """(architecture, version) of the OpenBLAS the step calls, or None if it is not one."""
    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas" and lib["filepath"] in blas.SOURCE:
            return lib.get("architecture"), lib.get("version")
    return None


def params_digest(params):
    h = hashlib.sha256()
    for k in PARAM_KEYS:
        p = np.ascontiguousarray(params[k])
        h.update(f"{k} {p.dtype.str} {p.shape}".encode())
        h.update(p.tobytes())
    return h.hexdigest()


def generated_data(kind, dtype, tiny_data):
    if kind == "gaussian":
        return tiny_data
    r = np.random.default_rng(42)
    # 530 training rows: not a multiple of the batch sizes, so every epoch ends on a short batch
    X_all = r.integers(0, 256, (530 + 40, 3072), dtype=np.uint8)
    y_all = r.integers(0, 10, 530 + 40)
    X_test, y_test = r.integers(0, 256, (20, 3072), dtype=np.uint8), r.integers(0, 10, 20)
    return split_and_normalise(X_all, y_all, X_test, y_test, 40, dtype, "generated")


def run_case(case_id, tiny_data):
    fields, kind = CASES[case_id]
    config = TrainConfig(**{"n_s": N_STEPS // 2, "cycles": 1, "evals_per_cycle": 2,
                            "eval_train_samples": 100, "seed": 7, **fields})
    data = generated_data(kind, fields["dtype"], tiny_data)
    with threadpool_limits(limits=1, user_api="blas"):
        params, history = fit(data, config)
    assert history[-1]["step"] == N_STEPS
    return params_digest(params)


@pytest.mark.parametrize("case_id", list(CASES))
def test_params_after_50_steps_are_bit_identical_to_the_recorded_ones(case_id, tiny_data):
    digest = run_case(case_id, tiny_data)
    key = blas_key()
    if key not in GOLDEN:
        pytest.skip(f"no digests recorded for the BLAS {key}; this one got {case_id}: {digest}")
    assert digest == GOLDEN[key][case_id]

"""The base protocol stays bit-identical: sha256 digests of the params after 50 training steps.

The digests were recorded with the step as it was before dropout and augmentation existed
(commit 22bc386: tests/data/golden_22bc386.py computes them with that commit's own code), on
generated data: uint8 pixels of CIFAR-10's row length (so the batch gather normalises pixels, as
on the real data) and, for the other gather path, the tiny Gaussian set. Any change to what the
base protocol computes or draws from the run's rng (one more random number per step shifts every
later shuffle) changes a digest.

Bit-level results depend on the BLAS kernels (OpenBLAS picks them per CPU family) and its
version, so the digests are keyed by both. Every x86-64 CPU this project runs on (Intel with
AVX-512 and AMX, AMD Zen 3 and Zen 4) can run OpenBLAS's Haswell kernels (AVX2 and FMA), which
$OPENBLAS_CORETYPE forces when NumPy loads: so the cases also run with those, in a subprocess,
and the check never depends on which CPU family CI lands on. With the CPU's own kernels they run
in-process where that kernel is recorded (or where Haswell's cannot run: then skipped, printing
the digests to record). The digests also depend on the BLAS thread count (with two threads
OpenBLAS splits some products differently: f64-m300-batch64 changes), so the runs are pinned to
one thread, as training is.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from clr_lambda_search.model import blas
from clr_lambda_search.model.dataset import split_and_normalise
from clr_lambda_search.model.network import PARAM_KEYS
from clr_lambda_search.model.precision import cpu_info
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
    ("Haswell", "0.3.31.188.0"): {  # NumPy 2.4's wheel; an AMD EPYC (Zen 3), or any CPU forced
        "f32-m50": "1f169b4742133f9814eaf8e1caf83de9764ea2b89fc05abb1019cbc745cf428b",
        "f64-m50": "3e8b5f7a8d01f1805387893d2f7d94185298065b97f9a8f94af7b79939fca7bc",
        "f32-m1024": "ac569822cae8b761a7d5f66fe6f33261f8c341031d026605cbd679a95caf1f7a",
        "f64-m300-batch64": "3b494437ae9b0f2f193101a87786fe2a2a38ba24ae7ca7d47770b1e58ca5796e",
        "f64-m10-gaussian": "37220bc8736d82cca9a57d45aefbdb4cc1922107a1e979598c9a8c540f2d9a4c",
    },
    ("SkylakeX", "0.3.31.188.0"): {  # NumPy 2.4's wheel on this project's 2-core AMD EPYC
        "f32-m50": "5b11e68dc9fbb526963ef3d1f8bd50424b1249a6e76d02ccce90aefa8b1e1ae0",
        "f64-m50": "652f52bf7c05130e9636c656e25b1dd876c0c35b90abe1bcce11ed5057dc2d9b",
        "f32-m1024": "e70e031918708304865a1a3d9cf966214d0d167d8162570155e92363775f829d",
        "f64-m300-batch64": "2ff26e6154a6cf4540b469afe95b18104929a61acd7cc2e3de62def02286b81f",
        "f64-m10-gaussian": "9f4eb27a560bd33698b88af00798f2b540a87ee89966fa959e631b61b6f2a262",
    },
}
HASWELL, HASWELL_FLAGS = "Haswell", {"avx2", "fma"}  # what OpenBLAS's Haswell kernels need


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


def kernels():
    """The kernels the cases run with: this CPU's own where they are recorded, and Haswell's,
    forced, where the CPU has AVX2 and FMA and its own are other ones. Where neither runs, the
    own ones (skipped, printing the digests to record)."""
    own = blas_key()
    forced = HASWELL_FLAGS <= cpu_info()[1] and (own is None or own[0] != HASWELL)
    return [k for k, runs in (("own", own in GOLDEN or not forced), (HASWELL, forced)) if runs]


@pytest.fixture(scope="module")
def forced_haswell():
    """(BLAS key, {case id: digest}) of every case run by a Python whose OpenBLAS was made to
    load its Haswell kernels (this file run as a script)."""
    env = {**os.environ, "OPENBLAS_CORETYPE": HASWELL}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    return tuple(result["key"]), result["digests"]


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("case_id", list(CASES))
def test_params_after_50_steps_are_bit_identical_to_the_recorded_ones(case_id, kernel, tiny_data,
                                                                     request):
    if kernel == "own":
        key, digest = blas_key(), run_case(case_id, tiny_data)
    else:
        key, digests = request.getfixturevalue("forced_haswell")
        assert key[0] == HASWELL, f"OPENBLAS_CORETYPE={HASWELL} was not obeyed: {key}"
        digest = digests[case_id]
    if key not in GOLDEN:
        message = f"no digests recorded for the BLAS {key}; this one got {case_id}: {digest}"
        if kernel == HASWELL and os.environ.get("CI"):
            pytest.fail(f"{message} (record them: tests/data/golden_22bc386.py)")
        pytest.skip(message)
    assert digest == GOLDEN[key][case_id]


if __name__ == "__main__":  # the cases' digests as JSON, with the BLAS this Python loaded
    from conftest import make_tiny_data

    print(json.dumps({"key": blas_key(),
                      "digests": {c: run_case(c, make_tiny_data()) for c in CASES}}))

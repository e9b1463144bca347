"""model.blas: the GEMM the compiled step calls, and the shim used where NumPy's BLAS is not
OpenBLAS, against NumPy's products."""
import ctypes
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from clr_lambda_search.model import blas

TRANS = [(False, False), (False, True), (True, False), (True, True)]


def operands(rng, dtype, trans_a, trans_b, m=7, k=5, n=3):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    expected = 0.5 * ((a.T if trans_a else a) @ (b.T if trans_b else b)) + 2.0 * c
    return a, b, c, expected


@njit
def _call_gemm(a, b, c, alpha, beta, trans_a, trans_b):
    blas.gemm(a, b, c, alpha, beta, trans_a, trans_b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_is_alpha_op_a_op_b_plus_beta_c(dtype, trans_a, trans_b):
    a, b, c, expected = operands(np.random.default_rng(0), dtype, trans_a, trans_b)
    _call_gemm(a, b, c, 0.5, 2.0, trans_a, trans_b)
    np.testing.assert_allclose(c, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_gemm_takes_only_contiguous_arrays():
    a = np.ones((4, 6))
    with pytest.raises(Exception, match="C-contiguous"):
        _call_gemm(a[:, ::2], np.ones((3, 2)), np.zeros((4, 2)), 1.0, 0.0, False, False)


def test_the_step_uses_numpys_own_blas():
    """On NumPy's wheels (this project's install) the kernels call the BLAS np.matmul calls."""
    assert "numpy" in blas.SOURCE.lower(), blas.SOURCE


@pytest.mark.parametrize("kind,dtype,c_float", [("s", np.float32, ctypes.c_float),
                                                ("d", np.float64, ctypes.c_double)])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_scipy_shim_has_cblas_row_major_semantics(kind, dtype, c_float, trans_a, trans_b):
    """The fallback for NumPy builds without OpenBLAS, called through its C signature."""
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    shim = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, c_float, ptr, i64, ptr, i64,
                            c_float, ptr, i64)(blas._scipy_shim(kind))
    a, b, c, expected = operands(np.random.default_rng(1), dtype, trans_a, trans_b)
    (m, n), k = c.shape, a.shape[0] if trans_a else a.shape[1]
    shim(101, 112 if trans_a else 111, 112 if trans_b else 111, m, n, k, 0.5, a.ctypes.data,
         a.shape[1], b.ctypes.data, b.shape[1], 2.0, c.ctypes.data, n)
    np.testing.assert_allclose(c, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


FALLBACK_STEP = """
import numpy as np
from clr_lambda_search.model import blas
print(blas._register(numpy_blas=False))  # before any kernel is loaded, so they link to the shims
from clr_lambda_search.model.network import init_params, loss_and_grads
from clr_lambda_search.model.step import StepParams, make_workspace, sgd_step
rng = np.random.default_rng(0)
X, y = rng.standard_normal((30, 20)), rng.integers(0, 10, 30)
params = StepParams(init_params(20, 8, 10, rng, dtype=np.float64))
ref = {k: v.copy() for k, v in params.items()}
ws = make_workspace(10, 20, 8, 10, np.float64)
for _ in range(5):
    idx = rng.permutation(30)[:10]
    sgd_step(params, X, y, idx, 0.1, 0.05, ws)
    grads = loss_and_grads(ref, X[idx], y[idx], 0.05)[2]
    ref = {k: ref[k] - 0.1 * grads[k] for k in ref}
print(max(float(np.abs(params[k] - ref[k]).max()) for k in params))
"""


def test_the_step_on_the_fallback_blas_equals_the_reference():
    """Where NumPy's BLAS is not OpenBLAS (macOS), the whole step runs on the shims: 5 steps in a
    fresh process whose kernels link to them equal the reference steps."""
    proc = subprocess.run([sys.executable, "-c", FALLBACK_STEP], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    source, error = proc.stdout.split("\n")[:2]
    assert source == "SciPy's BLAS (shim)"
    assert float(error) < 1e-12

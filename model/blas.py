"""GEMM for compiled kernels: C ← α·op(A)·op(B) + β·C on C-contiguous 2-D arrays, in NumPy's BLAS.

Why not np.matmul or numba's np.dot: np.matmul cannot accumulate into its output (β = 1), which
lets the step add its W1 update straight into W1 without a gradient buffer and a second pass; and
numba's np.dot calls SciPy's BLAS, a separate OpenBLAS build that runs the step's two products
5–17% slower on this machine than NumPy's 0.3.31 (measured: 0.462 vs 0.396 ms forward,
0.464 vs 0.442 ms backward).

NumPy's wheels bundle an ILP64 OpenBLAS (symbols scipy_cblas_sgemm64_, scipy_cblas_dgemm64_), the
same copy np.matmul uses and threadpoolctl pins; its cblas_?gemm is registered under our own
symbol names, which the kernels call. Where NumPy has another BLAS (macOS's Accelerate, a
distribution's build), the names point to shims over SciPy's BLAS instead: the same results to
round-off, at SciPy's speed. SOURCE says which one this process uses.
"""
import ctypes
import os

import numpy as np
from llvmlite import binding
from numba import cfunc, types
from numba.extending import overload
from numba.np.linalg import ensure_blas

from clr_lambda_search.model import cpu

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


def _cblas_signature(dtype):
    ptr = types.CPointer(dtype)
    return types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                      dtype, ptr, types.int64, ptr, types.int64, dtype, ptr, types.int64)


_KINDS = {"s": types.float32, "d": types.float64}
_SYMBOL = "clr_lambda_search_cblas_{}gemm"
_GEMM = {kind: types.ExternalFunction(_SYMBOL.format(kind), _cblas_signature(t))
         for kind, t in _KINDS.items()}


def _numpy_cblas(kind):
    """Address of NumPy's own ILP64 cblas_?gemm, or None if NumPy's BLAS is not that OpenBLAS."""
    from threadpoolctl import threadpool_info
    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas":
            continue
        fn = getattr(ctypes.CDLL(lib["filepath"]), f"scipy_cblas_{kind}gemm64_", None)
        if fn is not None:
            return ctypes.cast(fn, ctypes.c_void_p).value, lib["filepath"]
    return None


def _scipy_shim(kind):
    """A C function with cblas_?gemm's row-major signature over SciPy's column-major ?gemm.
    (ensure_blas loads SciPy's BLAS, at import of this module: before threadpoolctl pins it.)"""
    ensure_blas()
    dtype = _KINDS[kind]
    xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
        types.char, types.char, types.char, types.intp, types.intp, types.intp,
        types.CPointer(dtype), types.CPointer(dtype), types.intp, types.CPointer(dtype),
        types.intp, types.CPointer(dtype), types.CPointer(dtype), types.intp))
    np_dtype = np.dtype(str(dtype))

    @cfunc(_cblas_signature(dtype), cache=True)
    def shim(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        # row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands
        scalars = np.empty(2, np_dtype)
        scalars[0], scalars[1] = alpha, beta
        xxgemm(ord(kind), ord("t") if trans_b == _TRANS else ord("n"),
               ord("t") if trans_a == _TRANS else ord("n"), n, m, k, scalars[0:].ctypes, b, ldb,
               a, lda, scalars[1:].ctypes, c, ldc)
    return shim.address


def _register(numpy_blas=True):
    """Point our symbols at NumPy's cblas_?gemm (or, if absent or not numpy_blas, at the shims)
    and say which. Kernels link to whatever is registered when they are first loaded."""
    sources = set()
    for kind in _KINDS:
        found = _numpy_cblas(kind) if numpy_blas else None
        address, source = found if found else (_scipy_shim(kind), "SciPy's BLAS (shim)")
        binding.add_symbol(_SYMBOL.format(kind), address)
        sources.add(source)
    return " + ".join(sorted(sources))


SOURCE = _register()


def gemm(a, b, c, alpha, beta, trans_a=False, trans_b=False):
    """c ← alpha·op(a)·op(b) + beta·c; op transposes when trans_*. Compiled code only."""
    raise TypeError("model.blas.gemm is called from numba-compiled code")


@overload(gemm)
def _gemm(a, b, c, alpha, beta, trans_a=False, trans_b=False):
    if not all(x.layout == "C" and x.ndim == 2 and x.dtype == c.dtype for x in (a, b, c)):
        raise TypeError("gemm takes C-contiguous 2-D arrays of one dtype")
    fn = _GEMM["s" if a.dtype == types.float32 else "d"]
    dtype = a.dtype

    def impl(a, b, c, alpha, beta, trans_a=False, trans_b=False):
        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        fn(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
           m, n, k, dtype(alpha), a.ctypes, a.shape[1], b.ctypes, b.shape[1], dtype(beta),
           c.ctypes, n)
    return impl


# ---- bf16 products (MKL or oneDNN) ---------------------------------------------------------------
# bf16 numbers travel as their 16 bits (the upper half of a float32) in uint16 arrays. NumPy's
# OpenBLAS has no bf16 GEMM (built without sbgemm). The optional extra `bf16` installs two that
# have one (bf16 operands, fp32 accumulation and output), and which one is fast depends on the CPU:
# MKL's cblas_gemm_bf16bf16f32 dispatches by vendor and uses the bf16 instructions (AMX,
# AVX512_BF16) on Intel CPUs only: on AMD Zen 4 and Zen 5 it runs at fp32's speed. oneDNN's
# dnnl_gemm_bf16bf16f32 dispatches by instruction set: on a 2-core AMD EPYC Zen 5 (avx512_bf16),
# one thread, the step's two products at m = 1024, batch 100, took 2.9 ms against MKL's 12.5 ms
# and NumPy's fp32 10.5 ms. So Intel CPUs load MKL first, the others oneDNN first.
BF16 = np.uint16
BF16_INSTALL = "pip install 'clr-lambda-search[bf16]'"
# A product's B operand may also be packed once into MKL's own layout (cblas_gemm_bf16bf16f32_pack)
# and then used by several products (_compute): the step's backward product runs in blocks of
# rows, and each block of a plain call would pack the same B again. oneDNN has no such call: its
# "pack" (_onednn_pack below) copies B as it is, and its "compute" is the plain product.
_BF16_SYMBOLS = {name: f"clr_lambda_search_cblas_gemm_bf16bf16f32{name}"
                 for name in ("", "_pack", "_compute")}
_MKL_SEQUENTIAL, _MKL_LP64 = 1, 0  # MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64
_B_MATRIX, _PACKED = 162, 151     # CBLAS_IDENTIFIER CblasBMatrix, MKL's CblasPacked
_i32, _bf16p = types.int32, types.CPointer(types.uint16)
_GEMM_BF16_SIGNATURE = types.void(
    _i32, _i32, _i32, _i32, _i32, _i32, types.float32, _bf16p, _i32, _bf16p, _i32, types.float32,
    types.CPointer(types.float32), _i32)
_PACK_BF16_SIGNATURE = types.void(_i32, _i32, _i32, _i32, _i32, _i32, _bf16p, _i32, _bf16p)
_GEMM_BF16 = types.ExternalFunction(_BF16_SYMBOLS[""], _GEMM_BF16_SIGNATURE)
_COMPUTE_BF16 = types.ExternalFunction(_BF16_SYMBOLS["_compute"], _GEMM_BF16_SIGNATURE)
_PACK_BF16 = types.ExternalFunction(_BF16_SYMBOLS["_pack"], _PACK_BF16_SIGNATURE)
_bf16_state = {}


def _candidates(name):
    """Where a library libNAME.so may be: the environment's lib/ (pip puts MKL's and oneDNN's
    there), then the loader's search path."""
    import ctypes.util
    import glob
    import sys
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", f"lib{name}.so*")), reverse=True)
    named = ctypes.util.find_library(name)
    return found + ([named] if named else [])


def load_bf16():
    """(library name, path) once a bf16 GEMM ("MKL" or "oneDNN") is registered for the
    kernels, running on one thread (the workers are processes with one BLAS thread each), or
    (None, why not). Loads it on the first call only; fp32 runs never load it. Which one:
    $CLR_BF16_LIBRARY where set (to compare them on one machine), else MKL first on Intel CPUs
    and oneDNN first on the others."""
    if not _bf16_state:
        _bf16_state["result"] = _load_bf16(os.environ.get("CLR_BF16_LIBRARY", ""))
    return _bf16_state["result"]


def _load_bf16(chosen):
    loaders = {"MKL": _load_mkl, "oneDNN": _load_onednn}
    if chosen:
        order = [name for name in loaders if name.lower() == chosen.lower()]
        if not order:
            return None, (f"CLR_BF16_LIBRARY={chosen!r} names no bf16 GEMM: set it to MKL or "
                          "oneDNN, or unset it")
    else:
        order = ["MKL", "oneDNN"] if cpu.cpu_info()[0] == "GenuineIntel" else ["oneDNN", "MKL"]
    for name in order:
        found = loaders[name]()
        if found:
            return found
    return None, f"no bf16 GEMM is installed ({' or '.join(order)}: {BF16_INSTALL})"


def _load_mkl():
    for path in _candidates("mkl_rt"):
        try:
            lib = ctypes.CDLL(path)
            fns = {name: getattr(lib, f"cblas_gemm_bf16bf16f32{name}")
                   for name in (*_BF16_SYMBOLS, "_pack_get_size")}
        except (OSError, AttributeError):
            continue
        # before MKL's first computation: afterwards it keeps the layers it started with
        lib.MKL_Set_Interface_Layer(_MKL_LP64)
        lib.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
        for name, symbol in _BF16_SYMBOLS.items():
            binding.add_symbol(symbol, ctypes.cast(fns[name], ctypes.c_void_p).value)
        size = fns["_pack_get_size"]
        size.argtypes, size.restype = [ctypes.c_int] * 4, ctypes.c_size_t
        _bf16_state["pack_size"] = size
        return "MKL", path
    return None


# oneDNN exports dnnl_gemm_bf16bf16f32 (row-major, 'N'/'T' chars, 64-bit sizes; it returns a
# status) without declaring it in its public header: its own tests and Intel's TensorFlow
# extension declare it themselves, as we do. tests/test_precision.py checks its products, through
# the shims, against exact ones wherever it is installed on a CPU with bf16 instructions.
_DNNL_GEMM = "clr_lambda_search_dnnl_gemm_bf16bf16f32"
_DNNL_SET_THREADS = "clr_lambda_search_omp_set_num_threads"
_i64 = types.int64
_dnnl_gemm = types.ExternalFunction(_DNNL_GEMM, types.int32(
    types.int8, types.int8, _i64, _i64, _i64, types.float32, _bf16p, _i64, _bf16p, _i64,
    types.float32, types.CPointer(types.float32), _i64))
_omp_set_num_threads = types.ExternalFunction(_DNNL_SET_THREADS, types.void(types.int32))


def _load_onednn():
    for path in _candidates("dnnl"):
        shims = onednn_shims(path)
        if shims is None:
            continue
        gemm_shim, pack_shim = shims
        for name, shim in (("", gemm_shim), ("_pack", pack_shim), ("_compute", gemm_shim)):
            binding.add_symbol(_BF16_SYMBOLS[name], shim.address)
        _bf16_state["pack_size"] = lambda identifier, m, n, k: 2 * k * n
        return "oneDNN", path
    return None


def onednn_shims(path):
    """(gemm, pack) C functions with the signatures of MKL's cblas_gemm_bf16bf16f32 and its
    _pack over oneDNN's library at path (numba cfuncs: .address, .ctypes), or None where it
    cannot be loaded. Registers only oneDNN's own symbols, not the kernels' (_load_onednn)."""
    try:
        lib = ctypes.CDLL(path)
        gemm_fn = lib.dnnl_gemm_bf16bf16f32
        omp = ctypes.CDLL("libgomp.so.1")  # oneDNN's OpenMP runtime (onednn-cpu-gomp)
    except (OSError, AttributeError):
        return None
    binding.add_symbol(_DNNL_GEMM, ctypes.cast(gemm_fn, ctypes.c_void_p).value)
    binding.add_symbol(_DNNL_SET_THREADS,
                       ctypes.cast(omp.omp_set_num_threads, ctypes.c_void_p).value)
    return _onednn_gemm(), _onednn_pack()


def _onednn_gemm():
    """MKL's cblas_gemm_bf16bf16f32 (row-major) over oneDNN's, as a C function; a transb of
    _PACKED means B as _onednn_pack left it, i.e. B itself. Made after the symbols it calls."""
    @cfunc(_GEMM_BF16_SIGNATURE, cache=True)
    def gemm_shim(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        # OpenMP's thread count is per thread: set where the product runs, so that every
        # product is one thread's, as MKL's sequential layer is (fork-safe: no thread pool)
        _omp_set_num_threads(1)
        _dnnl_gemm(ord("T") if trans_a == _TRANS else ord("N"),
                   ord("T") if trans_b == _TRANS else ord("N"), m, n, k, alpha, a, lda, b, ldb,
                   beta, c, ldc)
    return gemm_shim


def _onednn_pack():
    """MKL's cblas_gemm_bf16bf16f32_pack for B (k×n, not transposed, ld = n) as a copy."""
    @cfunc(_PACK_BF16_SIGNATURE, cache=True)
    def pack_shim(layout, identifier, trans, m, n, k, src, ld, dest):
        for i in range(k * n):
            dest[i] = src[i]
    return pack_shim


def gemm_bf16(a, b, c, alpha, beta, trans_a, r0, r1):
    """c[r0:r1] ← alpha·op(a)[r0:r1]·b + beta·c[r0:r1] for bf16 a, b (uint16) and float32 c: op(a)
    is a, or aᵀ with trans_a (then its rows r0:r1 are the columns r0:r1 of a). Compiled code
    only, after load_bf16()."""
    raise TypeError("model.blas.gemm_bf16 is called from numba-compiled code")


@overload(gemm_bf16)
def _gemm_bf16(a, b, c, alpha, beta, trans_a, r0, r1):
    if not (a.dtype == b.dtype == types.uint16 and c.dtype == types.float32
            and all(x.layout == "C" and x.ndim == 2 for x in (a, b, c))):
        raise TypeError("gemm_bf16 takes C-contiguous 2-D bf16 (uint16) a, b and float32 c")

    def impl(a, b, c, alpha, beta, trans_a, r0, r1):
        n = c.shape[1]
        k = a.shape[0] if trans_a else a.shape[1]
        # row-major: op(a)'s row r0 starts r0 elements into a (trans_a) or r0 rows in; c's r0 rows in
        a_start = r0 if trans_a else r0 * a.shape[1]
        _GEMM_BF16(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _NO_TRANS, r1 - r0, n, k,
                   np.float32(alpha), a.reshape(a.size)[a_start:].ctypes, a.shape[1], b.ctypes, n,
                   np.float32(beta), c[r0:].ctypes, n)
    return impl


def packed_b_bf16(m, n, k):
    """A buffer for the B operand (k×n bf16) of products op(A)·B with op(A) m×k, packed by
    pack_b_bf16; after load_bf16()."""
    return np.empty(-(-_bf16_state["pack_size"](_B_MATRIX, m, n, k) // 2), BF16)


def pack_b_bf16(b, packed, m):
    """packed ← b (k×n bf16) in MKL's layout for products of m rows (gemm_bf16_packed).
    Compiled code only, after load_bf16()."""
    raise TypeError("model.blas.pack_b_bf16 is called from numba-compiled code")


@overload(pack_b_bf16)
def _pack_b_bf16(b, packed, m):
    def impl(b, packed, m):
        k, n = b.shape
        _PACK_BF16(_ROW_MAJOR, _B_MATRIX, _NO_TRANS, m, n, k, b.ctypes, n, packed.ctypes)
    return impl


def gemm_bf16_packed(a, packed, c, alpha, beta, trans_a, r0, r1):
    """gemm_bf16 with its b packed by pack_b_bf16 (the rows r0:r1 may be any block of the m
    rows it was packed for). Compiled code only, after load_bf16()."""
    raise TypeError("model.blas.gemm_bf16_packed is called from numba-compiled code")


@overload(gemm_bf16_packed)
def _gemm_bf16_packed(a, packed, c, alpha, beta, trans_a, r0, r1):
    def impl(a, packed, c, alpha, beta, trans_a, r0, r1):
        n = c.shape[1]
        k = a.shape[0] if trans_a else a.shape[1]
        a_start = r0 if trans_a else r0 * a.shape[1]
        _COMPUTE_BF16(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _PACKED, r1 - r0, n, k,
                      np.float32(alpha), a.reshape(a.size)[a_start:].ctypes, a.shape[1],
                      packed.ctypes, n, np.float32(beta), c[r0:].ctypes, n)
    return impl

"""bf16 products: the precision resolution, and a step that is correct and really bf16.

The bf16 tests run wherever the CPU has bf16 instructions and a bf16 GEMM is installed (MKL or
oneDNN: the extra `bf16`), with the one model.blas loads here, and skip elsewhere naming what is
missing.
"""
import ctypes
import dataclasses

import numpy as np
import pytest

from conftest import pixel_data
from clr_lambda_search.model import blas
from clr_lambda_search.model.cpu import cpu_info
from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.network import init_params
from clr_lambda_search.model.precision import BF16_FLAGS, bf16_missing, resolve_precision
from clr_lambda_search.model import step
from clr_lambda_search.model.schedule import cyclic_lr
from clr_lambda_search.model.step import (_BLOCK_ELEMENTS, _ONE_PRODUCT_ELEMENTS, StepParams,
                                          _round_bf16, batch_source, gather_batch, make_workspace,
                                          sgd_step)
from clr_lambda_search.model.train import TrainConfig, fit, updates

INTEL = ("GenuineIntel", frozenset({"avx512f", "avx512_bf16"}))
AMD = ("AuthenticAMD", frozenset({"avx512f", "avx512_bf16"}))
NO_FLAGS = ("GenuineIntel", frozenset({"avx2"}))
MKL, ONEDNN = ("MKL", "/lib/libmkl_rt.so.3"), ("oneDNN", "/lib/libdnnl.so.3")
NO_LIBRARY = (None, "no bf16 GEMM is installed (MKL or oneDNN)")

MISSING = bf16_missing()
needs_bf16 = pytest.mark.skipif(MISSING is not None, reason=f"bf16 cannot run here: {MISSING}")


# ---- resolution: every machine, through stand-ins for the CPU and the library -----------------

def test_fp32_is_fp32_everywhere():
    assert resolve_precision("fp32", NO_FLAGS, NO_LIBRARY)[0] == "fp32"


@pytest.mark.parametrize("info,library,missing", [(NO_FLAGS, MKL, BF16_FLAGS[0]),
                                                  (INTEL, NO_LIBRARY, "bf16 GEMM")])
def test_bf16_where_it_cannot_run_is_a_one_line_config_error(info, library, missing):
    with pytest.raises(ConfigError, match=missing) as e:
        resolve_precision("bf16", info, library)
    assert "\n" not in str(e.value) and "fp32" in str(e.value)  # and it says what to use instead


@pytest.mark.parametrize("info,library,expected,why", [
    (NO_FLAGS, MKL, "fp32", "no bf16 instructions"), (INTEL, NO_LIBRARY, "fp32", "GEMM is installed"),
    (AMD, MKL, "fp32", "AuthenticAMD"), (INTEL, MKL, "bf16", "MKL is installed"),
    (AMD, ONEDNN, "bf16", "oneDNN is installed"), (INTEL, ONEDNN, "bf16", "oneDNN")])
def test_auto_takes_bf16_only_where_it_pays_and_says_why(info, library, expected, why):
    got, reason = resolve_precision("auto", info, library)
    assert got == expected and why in reason


def test_explicit_bf16_runs_on_any_cpu_with_the_instructions():
    assert resolve_precision("bf16", AMD, MKL)[0] == "bf16"
    assert "about as fast as fp32" in resolve_precision("bf16", AMD, MKL)[1]
    assert resolve_precision("bf16", INTEL, MKL) == ("bf16", "bf16 requested (MKL)")
    assert resolve_precision("bf16", AMD, ONEDNN) == ("bf16", "bf16 requested (oneDNN)")


@pytest.mark.parametrize("vendor,first", [("GenuineIntel", "MKL"), ("AuthenticAMD", "oneDNN")])
def test_the_bf16_library_tried_first_is_the_one_that_is_fast_on_the_cpu(monkeypatch, vendor,
                                                                         first):
    """MKL uses bf16 instructions on Intel CPUs only, oneDNN on any: load_bf16 tries MKL first
    on Intel and oneDNN first elsewhere, and takes the other where the first is missing."""
    from clr_lambda_search.model import cpu
    tried = []
    loaders = {"MKL": "_load_mkl", "oneDNN": "_load_onednn"}
    for name, attr in loaders.items():
        monkeypatch.setattr(blas, attr, lambda name=name: tried.append(name) or (
            (name, f"/lib/{name}") if name != first else None))
    monkeypatch.setattr(cpu, "cpu_info", lambda: (vendor, frozenset({"avx512_bf16"})))
    monkeypatch.delenv("CLR_BF16_LIBRARY", raising=False)
    monkeypatch.setattr(blas, "_bf16_state", {})  # the process's own state stays as it is
    other = next(n for n in loaders if n != first)
    assert blas.load_bf16() == (other, f"/lib/{other}") and tried == [first, other]
    monkeypatch.setattr(blas, "_bf16_state", {})
    monkeypatch.setattr(blas, loaders[other], lambda: None)
    assert blas.load_bf16()[0] is None and "no bf16 GEMM" in blas.load_bf16()[1]


@pytest.mark.parametrize("chosen,tried", [("onednn", ["oneDNN"]), ("MKL", ["MKL"]),
                                          ("openblas", [])])
def test_clr_bf16_library_chooses_the_one_library_tried(monkeypatch, chosen, tried):
    """$CLR_BF16_LIBRARY (any case) names the one library tried, on any CPU; a name that is
    neither is the reason bf16 cannot run, saying what to set."""
    seen = []
    for name, attr in (("MKL", "_load_mkl"), ("oneDNN", "_load_onednn")):
        monkeypatch.setattr(blas, attr, lambda name=name: seen.append(name) or (name, "/lib"))
    monkeypatch.setenv("CLR_BF16_LIBRARY", chosen)
    monkeypatch.setattr(blas, "_bf16_state", {})
    name, detail = blas.load_bf16()
    assert seen == tried and name == (tried[0] if tried else None)
    if not tried:
        assert "CLR_BF16_LIBRARY='openblas'" in detail and "MKL or oneDNN" in detail


ONEDNN_PATHS = blas._candidates("dnnl")
U16, F32 = ctypes.POINTER(ctypes.c_uint16), ctypes.POINTER(ctypes.c_float)


@pytest.mark.skipif(not set(BF16_FLAGS) & cpu_info()[1] or not ONEDNN_PATHS,
                    reason="oneDNN's bf16 GEMM cannot run here: no bf16 instructions, or no "
                           "oneDNN installed")
@pytest.mark.parametrize("trans_a", [False, True], ids=["forward", "backward"])
def test_onednn_through_the_shims_computes_bf16_products_in_fp32(trans_a):
    """oneDNN's dnnl_gemm_bf16bf16f32 (not in its public header) through the shims with MKL's
    signature: C ← α·op(A)·B + β·C equals the exact product of the bf16 operands to fp32
    round-off, in both of the step's shapes, and with B "packed" (copied) too. Runs wherever
    oneDNN is installed, whichever library the kernels use."""
    gemm_shim, pack_shim = blas.onednn_shims(ONEDNN_PATHS[0])
    rng = np.random.default_rng(8)
    rows, k, n = (3072, 100, 60) if trans_a else (100, 3072, 60)
    a16 = rng.integers(0x3C00, 0x4000, (k, rows) if trans_a else (rows, k), dtype=np.uint16)
    b16 = rng.integers(0xBC00, 0xC000, (k, n), dtype=np.uint16)  # bf16 bits of -0.008 … -2
    c = rng.standard_normal((rows, n), dtype=np.float32)
    a, b = (as_float(x).astype(np.float64) for x in (a16, b16))
    exact = 0.5 * ((a.T if trans_a else a) @ b) + c
    for packed in (False, True):
        operand = b16
        if packed:
            operand = np.zeros_like(b16)
            pack_shim.ctypes(101, 162, 111, rows, n, k, b16.ctypes.data_as(U16), n,
                             operand.ctypes.data_as(U16))
        out = c.copy()
        gemm_shim.ctypes(101, 112 if trans_a else 111, 151 if packed else 111, rows, n, k, 0.5,
                         a16.ctypes.data_as(U16), a16.shape[1], operand.ctypes.data_as(U16), n,
                         1.0, out.ctypes.data_as(F32), n)
        assert np.abs(out - exact).max() / np.abs(exact).max() < 1e-6, (packed, trans_a)


def test_precision_is_a_checked_setting():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="float32"):
        TrainConfig(precision="bf16", dtype="float64")
    assert TrainConfig().precision == "fp32"  # the default, and dd2424's


# ---- the bf16 arithmetic ----------------------------------------------------------------------

def bf16_reference(a):
    """float32 -> bf16 (as float32 values), round to nearest even, in plain NumPy."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return r.view(np.float32)


def as_float(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_rounding_to_bf16_is_to_nearest_even_and_keeps_nan_and_inf():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(
        -30, 30, 10_000), [1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, np.inf, -np.inf]]).astype(np.float32)
    out = np.empty(a.shape, np.uint16)
    _round_bf16(a, out)
    np.testing.assert_array_equal(as_float(out), bf16_reference(a))
    assert as_float(out)[-5:-3].tolist() == [1.0, 1.0 + 4 * 2**-8]  # ties go to the even one
    # NaNs whose payload sits only in the low bits would round to inf: they stay NaN
    # and those whose high payload bits are all set would carry into the sign bit (±0)
    nans = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF],
                    np.uint32).view(np.float32)
    got = np.empty(nans.shape, np.uint16)
    _round_bf16(nans, got)
    assert np.isnan(as_float(got)).all()


def test_rounding_to_bf16_of_any_bit_pattern():
    """Every class of float32 (denormals, NaN payloads, both signs) from random bits, in blocks
    that are not a multiple of a vector's lanes: the compiled rounding is the reference, and a
    NaN keeps its sign and high payload bits, quieted."""
    bits = np.random.default_rng(1).integers(0, 2**32, 100_003, dtype=np.uint64).astype(np.uint32)
    a = bits.view(np.float32)
    out = np.empty(a.shape, np.uint16)
    _round_bf16(a, out)
    nan = np.isnan(a)
    assert 0 < nan.sum() < a.size  # the draw reaches both kinds
    np.testing.assert_array_equal(as_float(out[~nan]), bf16_reference(a[~nan]))
    np.testing.assert_array_equal(out[nan], ((bits[nan] >> 16) | 0x40).astype(np.uint16))


def one_step(precision, params, data, idx, eta=0.05, lam=0.01, block=None):
    """(params, workspace) after one step; block: the bf16 backward's (None: the library's)."""
    p = StepParams({k: v.copy() for k, v in params.items()})
    ws = make_workspace(len(idx), data.train.X.shape[1], params["W1"].shape[1], 10, np.float32,
                        precision=precision)
    ws["bf16_block"] = block
    sgd_step(p, data.train.X, data.train.y, idx, eta, lam, ws, data.train.pixels)
    return p, ws


@needs_bf16
@pytest.mark.parametrize("pixels", [True, False], ids=["from pixels", "from X"])
def test_the_bf16_products_are_bf16_operands_accumulated_in_fp32(pixels):
    """The step's forward product equals bf16(X_b)·bf16(W1) computed exactly (float64) to fp32
    accumulation round-off, and differs from the fp32 product by 1e-4..1e-2 relative: a path
    that silently computed in fp32 (or in lower precision than bf16) fails here."""
    data = pixel_data("float32")
    if not pixels:
        data = dataclasses.replace(data, train=dataclasses.replace(data.train, pixels=None))
    params = init_params(data.train.X.shape[1], 64, 10, np.random.default_rng(1), np.float32)
    idx = np.random.default_rng(2).permutation(len(data.train.y))[:100]
    _, ws = one_step("bf16", params, data, idx)
    _, ws32 = one_step("fp32", params, data, idx)
    Xb, W1 = data.train.X[idx], params["W1"]
    exact = bf16_reference(Xb).astype(np.float64) @ bf16_reference(W1).astype(np.float64)
    pre = ws["H"] - params["b1"]  # relu(X_b W1 + b1) where active; compare the active entries
    active = ws["H"] > 0
    scale = np.abs(exact).max()
    assert np.abs(pre - exact)[active].max() / scale < 1e-5  # fp32 accumulation of bf16 products
    fp32 = ws32["H"]
    rel = np.linalg.norm((ws["H"] - fp32)[active & (fp32 > 0)]) / np.linalg.norm(fp32[active])
    assert 1e-4 < rel < 1e-2, rel


@needs_bf16
@pytest.mark.parametrize("m,block", [(64, None), (200, None), (200, _BLOCK_ELEMENTS)],
                         ids=["one product", "the library's choice", "in blocks"])
def test_the_bf16_w1_update_is_the_bf16_backward_product(m, block):
    """The W1 update is −X_bᵀ dH with bf16 operands (dH: the step's own, left in the workspace)
    to fp32 accumulation round-off, and differs from the fp32 product of the same dH by
    1e-4..1e-2 relative. (Against the fp32 step's own update it differs more, ~5% here: the
    forward product's round-off flips the ReLU of units near 0, and a flipped unit's gradient
    row is all or nothing.)"""
    data = pixel_data("float32")
    params = init_params(data.train.X.shape[1], m, 10, np.random.default_rng(3), np.float32)
    idx = np.arange(100)
    p16, ws = one_step("bf16", params, data, idx, lam=0.0, block=block)
    update = (p16["W1"] - params["W1"]).astype(np.float64)
    Xb, dH = data.train.X[idx].astype(np.float64), ws["dH"].astype(np.float64)
    exact = -(bf16_reference(Xb).astype(np.float64).T @ bf16_reference(dH).astype(np.float64))
    assert np.linalg.norm(update - exact) / np.linalg.norm(exact) < 1e-5
    fp32 = -(Xb.T @ dH)
    rel = np.linalg.norm(exact - fp32) / np.linalg.norm(fp32)
    assert 1e-4 < rel < 1e-2, rel


@needs_bf16
@pytest.mark.parametrize("m,block", [(40, None), (200, None), (200, _BLOCK_ELEMENTS)],
                         ids=["one product", "the library's choice", "in blocks"])
@pytest.mark.parametrize("lam", [0.0, 0.01, 2.0], ids=["no decay", "pending", "rescaled"])
def test_w1s_bf16_copy_is_always_the_rounding_of_w1(lam, m, block):
    """The copy written after the backward product (block by block for a large W1 with MKL, or
    when forced; in one pass after it with oneDNN) and by settle is bf16(V) exactly, after every
    step, whether the decay is pending, settled or rescaled in the step."""
    assert (3072 * 40 <= _ONE_PRODUCT_ELEMENTS < 3072 * 200 and
            3072 * 200 > 2 * _BLOCK_ELEMENTS)  # the ids say what these widths run
    data = pixel_data("float32")
    params = StepParams(init_params(data.train.X.shape[1], m, 10, np.random.default_rng(4),
                                    np.float32))
    ws = make_workspace(50, data.train.X.shape[1], m, 10, np.float32, precision="bf16")
    ws["bf16_block"] = block  # None: the library's (model.step._packed_dH)
    rng = np.random.default_rng(5)
    for t in range(6):
        sgd_step(params, data.train.X, data.train.y, rng.permutation(300)[:50], 0.02, lam, ws,
                 data.train.pixels)
        V = dict.__getitem__(params, "W1")
        np.testing.assert_array_equal(as_float(params.w1_bf16), bf16_reference(V))
        if t == 3:
            params["b1"]  # a read of another key settles nothing
            params.items()  # a read of W1 settles it, and rounds the copy in the same pass
            assert params.w1_scale[0] == 1.0
            np.testing.assert_array_equal(as_float(params.w1_bf16), bf16_reference(V))


@pytest.mark.parametrize("pixels", [True, False], ids=["from pixels", "from X"])
def test_bf16_rows_rounded_once_are_the_batches_rounded_per_step(pixels):
    """batch_source's bf16 rows give every batch bit for bit as the step rounds it from the
    pixels (or from X), and no pixels: the step then only copies rows."""
    data = pixel_data("float32")
    train = data.train if pixels else dataclasses.replace(data.train, pixels=None)
    ws = make_workspace(50, train.X.shape[1], 8, 10, np.float32, precision="bf16")
    rows, rows_pixels = batch_source(train.X, train.pixels, ws)
    assert rows.dtype == np.uint16 and rows.shape == train.X.shape and rows_pixels is None
    want, got = np.empty((50, train.X.shape[1]), np.uint16), np.empty((50, train.X.shape[1]),
                                                                     np.uint16)
    for idx in (np.random.default_rng(6).permutation(len(train.y))[:50], np.arange(50)):
        gather_batch(train.X, idx, want, train.pixels)
        gather_batch(rows, idx, got)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(as_float(rows), bf16_reference(train.X))


@pytest.mark.parametrize("case", ["fp32", "augmented", "too large"])
def test_bf16_rows_are_made_only_for_bf16_batches_without_moves(case, monkeypatch):
    data = pixel_data("float32")
    precision = "fp32" if case == "fp32" else "bf16"
    if case == "too large":
        monkeypatch.setattr(step, "ROUNDED_ROWS_BYTES", data.train.X.size * 2 - 1)
    ws = make_workspace(50, data.train.X.shape[1], 8, 10, np.float32, flip=case == "augmented",
                        precision=precision)
    rows, rows_pixels = batch_source(data.train.X, data.train.pixels, ws)
    assert rows is data.train.X and rows_pixels is data.train.pixels


def test_a_moved_bf16_batch_is_the_moved_fp32_batch_rounded():
    """The augmented gather into bf16 (normalised per line, then rounded in a loop of its own)
    gives bit for bit bf16 of the augmented fp32 gather, for every kind of move."""
    data = pixel_data("float32")
    idx = np.random.default_rng(6).permutation(len(data.train.y))[:40]
    moves = np.stack([np.arange(40) % 2, np.arange(40) % 9 - 4, (np.arange(40) // 2) % 9 - 4], 1)
    batches = {}
    for precision in ("fp32", "bf16"):
        ws = make_workspace(40, data.train.X.shape[1], 8, 10, np.float32, flip=True, shift=4,
                            precision=precision)
        ws["moves"][:] = moves
        gather_batch(data.train.X, idx, ws["X"], data.train.pixels, ws["moves"])
        batches[precision] = ws["X"].copy()
    np.testing.assert_array_equal(as_float(batches["bf16"]), bf16_reference(batches["fp32"]))
    assert not np.array_equal(batches["fp32"][1], data.train.X[idx[1]])  # the moves moved


def test_a_bf16_step_without_a_bf16_gemm_is_an_error_that_leaves_the_params(monkeypatch):
    """A bf16 workspace needs no bf16 library (batch_source's rows above); its first step does,
    and without one it stops with the reason before touching the params (model.precision
    refuses bf16 before a run; this is a direct call)."""
    monkeypatch.setattr(step, "load_bf16", lambda: NO_LIBRARY)
    data = pixel_data("float32")
    params = StepParams(init_params(data.train.X.shape[1], 8, 10, np.random.default_rng(3),
                                    np.float32))
    before = {k: v.copy() for k, v in params.items()}
    ws = make_workspace(20, data.train.X.shape[1], 8, 10, np.float32, precision="bf16")
    with pytest.raises(RuntimeError, match="bf16 products need a bf16 GEMM: no bf16 GEMM"):
        sgd_step(params, data.train.X, data.train.y, np.arange(20), 0.01, 1e-3, ws,
                 data.train.pixels)
    for key, value in before.items():
        np.testing.assert_array_equal(params[key], value)


@needs_bf16
def test_bf16_training_from_rows_is_the_step_on_pixels():
    """model.train's loop (which gathers from batch_source's rows) updates the params exactly as
    sgd_step on the pixels does, batch for batch."""
    data = pixel_data("float32")
    config = TrainConfig(lam=1e-3, m=16, n_batch=50, eta_max=0.05, n_s=4, cycles=1,
                         evals_per_cycle=1, precision="bf16")
    init = init_params(data.train.X.shape[1], 16, 10, np.random.default_rng(7), np.float32)
    trained, by_step = (StepParams({k: v.copy() for k, v in init.items()}) for _ in range(2))
    ws = make_workspace(50, data.train.X.shape[1], 16, 10, np.float32, precision="bf16")
    ws_ref = make_workspace(50, data.train.X.shape[1], 16, 10, np.float32, precision="bf16")
    rng, ref_rng = np.random.default_rng(8), np.random.default_rng(8)
    perm, n = None, len(data.train.y)
    for state in updates(trained, data, config, rng, ws):
        if state["pos"] == config.n_batch:  # an epoch started: draw its permutation as it did
            perm = ref_rng.permutation(n)
        idx = perm[state["pos"] - config.n_batch:state["pos"]]
        eta = cyclic_lr(state["t"] - 1, config.eta_min, config.eta_max, config.n_s)
        sgd_step(by_step, data.train.X, data.train.y, idx, eta, config.lam, ws_ref,
                 data.train.pixels)
    for key in ("W1", "b1", "W2", "b2"):
        np.testing.assert_array_equal(trained[key], by_step[key])


CURVE = TrainConfig(lam=1e-3, m=64, n_batch=50, eta_max=0.05, n_s=30, cycles=2,
                    evals_per_cycle=4, eval_train_samples=0, flip=True, shift=2, dropout=0.2)


@needs_bf16
def test_bf16_training_follows_the_fp32_curve():
    """The same seed trained in fp32 and bf16 (dropout and augmentation on): at every evaluation
    point the validation loss agrees within 5% and the training loss within 5% (tolerances
    fixed before the first measurement: bf16's ~3e-3 relative products move a 120-step run's
    losses by well under 1%), and the runs are not the same (the bf16 path was taken)."""
    data = pixel_data("float32")
    _, h32 = fit(data, CURVE)
    _, h16 = fit(data, dataclasses.replace(CURVE, precision="bf16"))
    for a, b in zip(h32[1:], h16[1:]):
        for split in ("train", "val"):
            assert abs(a[split]["loss"] - b[split]["loss"]) <= 0.05 * a[split]["loss"], (a, b)
    assert h32[-1]["val"]["loss"] != h16[-1]["val"]["loss"]
    assert h32[-1]["train"]["acc"] > 0.5  # the runs learned something to compare


def test_bf16_on_a_cpu_without_it_stops_the_run_before_training(monkeypatch, tiny_data):
    """fit() with precision "bf16" where the CPU lacks the instructions: the one-line ConfigError
    (scripts print it and exit 2), before a single step; "auto" trains in fp32 there."""
    from clr_lambda_search.model import precision
    precision.cpu_info.cache_clear()
    monkeypatch.setattr(precision, "cpu_info", lambda: NO_FLAGS)
    config = TrainConfig(m=8, n_batch=10, n_s=5, cycles=1, evals_per_cycle=1, dtype="float32")
    data = tiny_data
    seen = []
    with pytest.raises(ConfigError, match="no bf16 instructions"):
        fit(data, dataclasses.replace(config, precision="bf16"), on_eval=seen.append)
    assert seen == []
    auto, _ = fit(data, dataclasses.replace(config, precision="auto"))
    fp32, _ = fit(data, config)
    assert all(np.array_equal(auto[k], fp32[k]) for k in fp32)

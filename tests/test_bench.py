"""scripts/bench.py --quick runs end to end and prints the figures issue #5 asks for.

No timing is asserted (the machines are shared and noisy): only that every figure is there, is a
positive finite number, and that the ratios are the quotients of the figures printed beside them.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clr_lambda_search.model import blas
from clr_lambda_search.model.precision import bf16_missing

REPO = Path(__file__).resolve().parents[1]
KEYS = ("floor_ms", "step_ms", "step_over_floor", "trial_over_floor", "workers2_over_workers1",
        "floor_ms_m1024", "step_ms_m1024", "step_over_floor_m1024", "floor_ms_m1024_t2",
        "step_ms_m1024_t2", "step_over_floor_m1024_t2", "wide_procs_over_threads",
        "runners2_over_runners1")


@pytest.fixture(scope="module")
def quick_bench():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}  # synthetic data
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
                           "--json", "-q"], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_bench_prints_every_figure(quick_bench):
    assert quick_bench["data"].startswith("synthetic") and quick_bench["quick"] is True
    assert quick_bench["blas"] == blas.SOURCE
    for key in KEYS + ("gather_ms", "floor_sustained_ms", "trial_s", "trial_over_best_floor"):
        value = quick_bench[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert "pipeline_over_floor" not in quick_bench  # the pipeline needs CIFAR-10 and no --quick


HALF_DIGIT = 5e-5  # the JSON rounds every figure to 4 decimals


def is_quotient(ratio, numerator, denominator):
    """Whether the rounded ratio can be the quotient of the unrounded figures behind the rounded
    numerator and denominator: the tolerance follows from the rounding, however small the
    figures are (on a fast machine a 0.09 ms step is only 3 significant digits)."""
    low = (numerator - HALF_DIGIT) / (denominator + HALF_DIGIT)
    high = (numerator + HALF_DIGIT) / (denominator - HALF_DIGIT)
    return low - HALF_DIGIT <= ratio <= high + HALF_DIGIT


def approx_quotient(numerator, denominator):
    class Quotient:
        def __eq__(self, ratio):
            return is_quotient(ratio, numerator, denominator)

        def __repr__(self):
            return f"the quotient of {numerator} / {denominator} (each ±{HALF_DIGIT})"
    return Quotient()


def test_a_ratio_is_checked_to_the_rounding_of_its_figures():
    assert is_quotient(1.1184, 1.0118, 0.9046)  # this machine's step_over_floor
    assert is_quotient(1.0526, 0.0947, 0.0900)  # 0.094 7 / 0.090 0 = 1.0522: within the rounding
    assert not is_quotient(1.0600, 0.0947, 0.0900)
    assert not is_quotient(1.1200, 1.0118, 0.9046)


def test_bench_ratios_are_the_quotients_of_its_figures(quick_bench):
    b = quick_bench
    assert b["step_over_floor"] == approx_quotient(b["step_ms"], b["floor_ms"])
    assert b["trial_over_floor"] == approx_quotient(
        b["trial_s"] * 1e3 / 3200, b["floor_sustained_ms"])
    assert b["trial_over_best_floor"] == approx_quotient(
        b["trial_s"] * 1e3 / 3200, b["floor_ms"])
    assert b["workers2_over_workers1"] == approx_quotient(
        b["workers2_trials_per_min"], b["workers1_trials_per_min"])
    for suffix in ("_m1024", "_m1024_t2"):
        assert b["step_over_floor" + suffix] == approx_quotient(
            b["step_ms" + suffix], b["floor_ms" + suffix])
    assert b["runners2_over_runners1"] == approx_quotient(
        b["runners2_phase_s"], b["runners1_phase_s"])
    assert b["wide_procs_over_threads"] == approx_quotient(
        b["wide_procs_steps_per_s"], b["wide_threads_steps_per_s"])


def test_the_bench_leaves_out_exactly_the_confirm_phase():
    from clr_lambda_search.search.cli.bench import without_confirm
    from clr_lambda_search.search.campaign import DEFAULT, load_campaign

    full = load_campaign(DEFAULT)
    plain = without_confirm(full)
    assert [p.name for p in full.phases] == [p.name for p in plain.phases] + ["confirm"]
    assert plain.final == full.final and plain.phases == full.phases[:-1]


BF16_MISSING = bf16_missing()


def test_bench_reports_the_bf16_figures_or_why_not(quick_bench):
    b = quick_bench
    if BF16_MISSING:  # a CPU without bf16 instructions or no bf16 GEMM: it says so instead
        assert b["bf16"] == f"not measured: {BF16_MISSING}"
        return
    assert b["bf16_library"].split()[0] in ("MKL", "oneDNN")  # which one it measured
    for key in ("bf16_floor_ms_m1024", "bf16_step_ms_m1024", "bf16_copy_pass_ms_m1024",
                "bf16_over_fp32_step_m50", "bf16_over_fp32_step_m1024"):
        assert isinstance(b[key], float) and math.isfinite(b[key]) and b[key] > 0, key
    assert b["bf16_step_over_floor_m1024"] == approx_quotient(
        b["bf16_step_ms_m1024"], b["bf16_floor_ms_m1024"])
    assert b["bf16_outside_minus_fp32_ms_m50"] == pytest.approx(
        b["bf16_outside_gemms_ms_m50"] - b["fp32_outside_gemms_ms_m50"], abs=2e-4)

"""Which precision the step's two large products run in: fp32, or bf16 operands with fp32
accumulation and fp32 master weights (TrainConfig.precision; model.step does the arithmetic).

"bf16" needs a CPU with bf16 instructions and MKL's bf16 GEMM (the optional extra `bf16`); asked
for where either is missing it is a one-line ConfigError, never a slow emulation. "auto" takes
bf16 where it pays and fp32 elsewhere, and says why. MKL dispatches its bf16 kernels by CPU
vendor: on AMD Zen 4 (avx512_bf16, measured here) cblas_gemm_bf16bf16f32 ran at 1.05× the time of
an fp32 GEMM of the same shapes, i.e. without the bf16 instructions; so "auto" takes bf16 on Intel
CPUs only, while an explicit "bf16" runs (truly in bf16, at about fp32's speed) on any CPU with
the instructions.
"""
import logging
from functools import lru_cache

from clr_lambda_search.model import blas
from clr_lambda_search.model.errors import ConfigError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "auto")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 instructions
INSTALL = "pip install 'clr-lambda-search[bf16]'"


@lru_cache(maxsize=1)
def cpu_info(path="/proc/cpuinfo"):
    """(vendor, set of flags) of this machine's first CPU; ("", empty set) where unreadable."""
    vendor, flags = "", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, frozenset(flags)


def bf16_missing(info=None, library=None):
    """None where bf16 can run here, else why not (the missing CPU flag or library).

    info: (vendor, flags) as cpu_info returns; library: (ok, path or reason) as
    model.blas.load_bf16 returns (both default to this machine's)."""
    _, flags = info or cpu_info()
    if not flags & set(BF16_FLAGS):
        return f"this CPU has no bf16 instructions (no {' or '.join(BF16_FLAGS)} flag)"
    ok, detail = library or blas.load_bf16()
    return None if ok else f"{detail} ({INSTALL})"


def resolve_precision(requested, info=None, library=None):
    """The precision a run of `requested` ("fp32", "bf16" or "auto") computes in here, and why:
    -> ("fp32" | "bf16", reason). ConfigError for "bf16" where it cannot run, or an unknown name.
    info, library: see bf16_missing (for tests of other machines)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision = {requested!r} is invalid: choose one of "
                          f"{', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", "fp32 requested"
    missing = bf16_missing(info, library)
    vendor, _ = info or cpu_info()
    if requested == "bf16":
        if missing:
            raise ConfigError(f"precision = 'bf16' cannot run here: {missing}; use precision = "
                              "'fp32' or 'auto'")
        if vendor != "GenuineIntel":
            return "bf16", (f"bf16 requested; MKL does not use the bf16 instructions of this "
                            f"{vendor or 'unknown'} CPU, so it is about as fast as fp32")
        return "bf16", "bf16 requested"
    if missing:
        return "fp32", f"auto: fp32, since {missing}"
    if vendor != "GenuineIntel":
        return "fp32", (f"auto: fp32, since MKL does not use the bf16 instructions of this "
                        f"{vendor or 'unknown'} CPU (bf16 would be no faster)")
    return "bf16", "auto: bf16 (the CPU has bf16 instructions and MKL is installed)"

"""Which precision the step's two large products run in: fp32, or bf16 operands with fp32
accumulation and fp32 master weights (TrainConfig.precision; model.step does the arithmetic).

"bf16" needs a CPU with bf16 instructions and a bf16 GEMM: MKL's or oneDNN's (the optional extra
`bf16` installs both; model.blas loads the one that suits the CPU); asked for where either is
missing it is a one-line ConfigError, never a slow emulation. "auto" takes bf16 where it pays and
fp32 elsewhere, and says why. MKL dispatches its bf16 kernels by CPU vendor: on AMD Zen 4
(avx512_bf16) its cblas_gemm_bf16bf16f32 ran at 1.05× the time of an fp32 GEMM of the same
shapes, i.e. without the bf16 instructions, while oneDNN uses them on any vendor's CPU. So "auto"
takes bf16 with oneDNN, or with MKL on an Intel CPU; an explicit "bf16" runs (truly in bf16) on
any CPU with the instructions.
"""
import logging

from clr_lambda_search.model import blas
from clr_lambda_search.model.cpu import cpu_info
from clr_lambda_search.model.errors import ConfigError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "auto")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 instructions


def bf16_missing(info=None, library=None):
    """None where bf16 can run here, else why not (the missing CPU flag or library).

    info: (vendor, flags) as cpu_info returns; library: (name or None, path or reason) as
    model.blas.load_bf16 returns (both default to this machine's)."""
    _, flags = info or cpu_info()
    if not flags & set(BF16_FLAGS):
        return f"this CPU has no bf16 instructions (no {' or '.join(BF16_FLAGS)} flag)"
    ok, detail = library or blas.load_bf16()
    return None if ok else detail


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
    if requested == "bf16" and missing:
        raise ConfigError(f"precision = 'bf16' cannot run here: {missing}; use precision = "
                          "'fp32' or 'auto'")
    if missing:
        return "fp32", f"auto: fp32, since {missing}"
    vendor, _ = info or cpu_info()
    name, _ = library or blas.load_bf16()
    slow = name == "MKL" and vendor != "GenuineIntel"
    if requested == "bf16":
        return "bf16", (f"bf16 requested; MKL does not use the bf16 instructions of this "
                        f"{vendor or 'unknown'} CPU, so it is about as fast as fp32 (oneDNN "
                        f"would: {blas.BF16_INSTALL})" if slow else f"bf16 requested ({name})")
    if slow:
        return "fp32", (f"auto: fp32, since MKL does not use the bf16 instructions of this "
                        f"{vendor or 'unknown'} CPU (bf16 would be no faster; oneDNN would use "
                        f"them: {blas.BF16_INSTALL})")
    return "bf16", f"auto: bf16 (the CPU has bf16 instructions and {name} is installed)"

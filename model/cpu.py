"""This machine's CPU as /proc/cpuinfo describes it (vendor and instruction-set flags)."""
from functools import lru_cache


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

"""The CPUs a command may use and the BLAS threads it computes with."""
import os


def cpu_count():
    """The CPUs this process may run on (its affinity), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def single_blas_thread():
    """Pin BLAS to one thread: these GEMMs are too small for two (see DESIGN.md, Speed)."""
    return blas_threads(1)


def blas_threads(n):
    """Limit BLAS to n threads (the step's kernels call the same BLAS: model.blas)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")

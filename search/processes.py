"""Forked worker processes that never outlive their run: they stop with their parent (SIGTERM
when it dies, even by SIGKILL, on Linux), and a parent that stops stops them within seconds."""
import ctypes
import logging
import os
import signal
import sys
import time

from clr_lambda_search.model.errors import Terminated

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_GRACE = 10.0     # seconds a signalled child gets to fail its trial before SIGKILL


def die_with_parent(parent_pid):
    """In a forked child: receive SIGTERM when the parent dies (Linux). Raises Terminated if the
    parent is already gone (it died between the fork and this call)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("cannot ask to be stopped with the parent (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:
        raise Terminated()


def stop_processes(procs, signum, grace=STOP_GRACE):
    """Send signum to the live processes, wait up to `grace` seconds for all of them, then
    SIGKILL the rest; every process is reaped."""
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.warning("%s did not stop within %.0f s: killed", p.name, grace)
            p.kill()
        p.join()


def exit_code(error):
    """The exit status of a child stopped by this KeyboardInterrupt: 143 for SIGTERM, else 130."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)

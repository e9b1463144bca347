"""Run a command under limits set before it starts: `python tests/limited.py [--memory BYTES]
[--file-size BYTES] [--drop-dac] -- COMMAND...` sets them in this process and execs COMMAND.

What a preexec_fn did, without one: a preexec_fn runs Python in the child between fork and exec,
which is unsafe once the test process has threads (a gRPC proxy, a dashboard server). Rlimits
and the capability bounding set survive exec. --drop-dac (for root) drops CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH from the bounding set, so the command, still uid 0 and owner of its files,
obeys file permissions like any user. envlib.limited builds the argv.
"""
import argparse
import ctypes
import os
import resource
import sys

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, capability.h


def drop_dac():
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", type=int, help="address space cap (RLIMIT_AS), bytes")
    parser.add_argument("--file-size", type=int, help="largest file it may write, bytes")
    parser.add_argument("--drop-dac", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.memory:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory, args.memory))
    if args.file_size:
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size, args.file_size))
    if args.drop_dac:
        drop_dac()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()

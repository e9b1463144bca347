"""A one-node SLURM cluster of its own on 127.0.0.1 for a test: munged, slurmctld and slurmd from
Debian's packages (slurm-wlm, munge), every file under one temporary folder, free ports, started
in the foreground as this test's children and stopped by their process ids.

The settings are those verified on these machines (shared/DESIGN.md): auth/munge with the key the
munge package installs (our own munged on a socket of its own), proctrack/linuxproc and task/none
(no cgroups), select/cons_tres with CR_CPU, one node of 2 CPUs in an OverSubscribe=YES partition
(jobs submitted with --oversubscribe share its CPUs).
"""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")
START_WAIT = 60  # seconds for the node to come up idle


def skip_unless_possible():
    """Skip (with the reason) unless this is root with the SLURM and munge programs."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test starts slurmd, which needs root")
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing or not MUNGE_KEY.is_file():
        pytest.skip(f"SLURM test: {', '.join(missing) or MUNGE_KEY} missing "
                    "(apt-get install slurm-wlm munge; .ci/run does)")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """with Cluster(tmp) as c: c.env (SLURM_CONF set) runs sbatch/sinfo against it."""

    def __init__(self, root, cpus=2):
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs = []

    def _conf(self):
        r = self.root
        ctld_port, slurmd_port = _free_ports(2)
        return "\n".join([
            "ClusterName=clrtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={r / 'munge.socket'}",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=20000 "
            "State=UNKNOWN",
            f"PartitionName=main Nodes={self.host} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=YES",
            "",
        ])

    @property
    def env(self):
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def _start(self, args, log):
        with open(self.root / log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self):
        for d in ("state", "spool", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "slurm.conf").write_text(self._conf())
        r = self.root
        self._start(["munged", "--foreground", "--force", f"--socket={r / 'munge.socket'}",
                     f"--key-file={MUNGE_KEY}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                     f"--log-file={r / 'munge' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'munged.seed'}"], "munged.out")
        self._wait(lambda: (r / "munge.socket").exists(), "munged's socket")
        self._start(["slurmctld", "-D", "-c", "-f", str(r / "slurm.conf")], "slurmctld.out")
        self._start(["slurmd", "-D", "-f", str(r / "slurm.conf")], "slurmd.out")
        self._wait(self._node_idle, "the node to come up idle")
        return self

    def _node_idle(self):
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, text=True,
                             capture_output=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, what):
        deadline = time.monotonic() + START_WAIT
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"SLURM test cluster: no {what} ({', '.join(dead) or 'timeout'}"
                                   f"); logs:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, n=2000):
        texts = []
        for name in ("munged.out", "munge/munged.log", "slurmctld.log", "slurmd.log",
                     "slurmctld.out", "slurmd.out"):
            p = self.root / name
            if p.is_file():
                texts.append(f"--- {name}\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(texts)

    def __exit__(self, *exc):
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []

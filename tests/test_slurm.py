"""The SLURM recipe for real: slurm/campaign.sbatch, the batch script users copy, submitted as a
job array of 3 tasks to a one-node SLURM cluster this test starts itself (tests/slurmlib.py),
every task a pipeline of ONE campaign against CI's PostgreSQL ($CLR_PG_URL, given to the tasks as
$OPTUNA_STORAGE). The 3 tasks run at the same time on the node's 2 CPUs (--oversubscribe) and
must leave the studies one runner leaves (tests/runnerlib.py's checks), each with its own --json
summary, all of them the same.

Needs root, slurm-wlm, munge and $CLR_PG_URL (.ci/run installs and starts them); skipped with the
reason otherwise. Run alone: `python -m pytest -m slurm tests/test_slurm.py`.
"""
import re
import subprocess
import sys
import uuid

import pytest

import faultlib as fl
import runnerlib as rl
import slurmlib

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.integration]

SBATCH = fl.REPO / "slurm" / "campaign.sbatch"
TASKS = 3
WAIT = 300  # seconds for the whole array; ~60 s here
_MARK = re.compile(r"^campaign\.sbatch: task (\d+) .*(started|finished) ([0-9.]+)", re.M)


def _flags_without_workers(flags):
    """The tiny pipeline flags minus --workers: the batch script sets it from the task's CPUs."""
    i = flags.index("--workers")
    return flags[:i] + flags[i + 2:]


def task_runs(log_dir):
    """A runnerlib.Run per array task from its SLURM output files, and its (start, end) times."""
    runs, spans = [], []
    for i in range(TASKS):
        out, err = log_dir / f"task-{i}.out", log_dir / f"task-{i}.err"
        stdout = out.read_text() if out.exists() else ""
        stderr = err.read_text() if err.exists() else ""
        status = re.search(r"finished [0-9.]+ with status (\d+)", stderr)
        lines = stdout.strip().splitlines()
        run = rl.Run(f"task{i}", int(status.group(1)) if status else None, None, stdout, stderr)
        if len(lines) == 1:
            try:
                run.summary = rl.json.loads(lines[0])
            except ValueError:
                pass
        runs.append(run)
        marks = {kind: float(t) for _, kind, t in _MARK.findall(stderr)}
        spans.append((marks.get("started"), marks.get("finished")))
    return runs, spans


@pytest.mark.timeout(WAIT + 120)
def test_a_job_array_of_three_tasks_runs_one_campaign_once(cifar_tiny_dir, tmp_path):
    slurmlib.skip_unless_possible()
    url = fl.pg_url_or_skip()
    campaign = f"slurm-{uuid.uuid4().hex[:10]}"  # unique: the database outlives the test
    fl.init_schema(url)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = {**rl.env_for(tmp_path), "OPTUNA_STORAGE": url, "CLR_PYTHON": sys.executable,
           "CLR_REPO": str(fl.REPO)}
    args = ["--campaign", campaign, "--data-dir", cifar_tiny_dir.batches,
            "--out-dir", tmp_path / "out", *_flags_without_workers(rl.TINY_PIPELINE)]
    try:
        with slurmlib.Cluster(tmp_path / "slurm") as cluster:
            env["SLURM_CONF"] = cluster.env["SLURM_CONF"]
            sbatch = subprocess.run(
                ["sbatch", f"--array=0-{TASKS - 1}", "--wait", "--oversubscribe",
                 "--cpus-per-task=1", f"--chdir={tmp_path}", f"--output={log_dir}/task-%a.out",
                 f"--error={log_dir}/task-%a.err", str(SBATCH), *map(str, args)],
                env=env, text=True, capture_output=True, timeout=WAIT)
            cluster_logs = cluster.logs()
        runs, spans = task_runs(log_dir)
        assert sbatch.returncode == 0, (f"sbatch exited {sbatch.returncode}: {sbatch.stderr}\n"
                                        + "\n".join(r.tail() for r in runs) + cluster_logs)
        rl.assert_no_problems(rl.campaign_problems(url, campaign, runs, TASKS), runs)
        # every task ran with the one worker its CPU count gives, and all three at the same time
        for run in runs:
            assert re.search(r"on \S+, 1 worker\(s\)", run.stderr), run.stderr[-500:]
        assert all(s is not None and e is not None for s, e in spans), spans
        assert max(s for s, _ in spans) < min(e for _, e in spans), (
            f"the tasks did not overlap in time: (start, end) {spans}")
    finally:
        rl.delete_campaign(url, campaign)

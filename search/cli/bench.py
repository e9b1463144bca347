"""Speed benchmark: the training step, a search trial and parallel workers against the GEMM floor.

    python scripts/bench.py [--data-dir DIR] [--quick] [--json]
    python scripts/bench.py --search [--campaign-seeds 5] [--workers 2] [--out FILE.json]

--search runs the measured comparison with plain Optuna instead (search.compare, documented in
docs/search-comparison.md): the campaign's phases against a TPE and a random study of the same
budget in updates, per campaign seed; its numbers to --out, its anytime figure to --figure.


Everything runs in float32 with one BLAS thread (but the figures named for two threads), and
every figure is a ratio to a floor measured in the same run, like for like. Floor, step and
evaluation are the CPU time of the calling thread (one BLAS thread computes in the caller), best
of many short interleaved blocks, so that other processes on the machine shift them little.
Trials and the pipeline are long runs in wall time, as a search sees them; on a shared machine a
long run is slower than its best 50-step block (here the median step of a trial is ~1.3× its
best one), so they are divided by a floor measured the same way: 3,200 GEMM pairs back to back,
wall time, run before each timed trial (the ratios to the best-of-blocks floor_ms are printed
too, as *_over_best_floor):
  floor_ms                the two GEMMs a step cannot avoid, X_b W1 (100×3072 · 3072×50) and
                          X_bᵀ dH (3072×100 · 100×50), best of the repeats
  step_ms                 model.step.sgd_step on batches gathered by random indices from the
                          49,000-row training pixels, as train() does, best of the same repeats
  *_m1024                 the same at m = 1024 with dropout 0.5, flips and ±4-pixel translations
                          (each step draws its mask and moves from the rng, as train() does), the
                          floor's GEMMs at m = 1024 too; 10 calls per block
  *_m1024_t2              the same with two BLAS threads, floor and step in wall time (the
                          CPU time of the calling thread misses the second thread's work)
  wide_procs_over_threads steps per second of m = 1024 (dropout and augmentation on) in two
                          processes of one BLAS thread each ÷ one process of two threads, wall
                          time, the runs in the order 2×1, 1×2, 1×2, 2×1 (2×1, 1×2 with --quick):
                          > 1 means two one-thread workers search faster than one two-thread one
  floor_sustained_ms      the floor of 3,200 GEMM pairs back to back (wall), best of 3 (1 with
                          --quick), each run just before a timed trial
  trial_over_floor        a coarse-protocol trial (dd2424's coarse phase, 3,200 steps and
                          its evaluations) through Objective into an SQLite study ÷ 3,200
                          sustained floors, best of 3 trials (1 with --quick)
  workers2_over_workers1  trials per minute of 2 worker processes ÷ 1 worker of one runner,
                          through search.core.run_phase (runs of 8 trials of one cycle of n_s
                          400 each, in the order 1, 2, 2, 1 workers; 4 trials of n_s 200 and the
                          order 1, 2 with --quick)
  runners2_over_runners1  the wall time of one search phase run by 2 runners (processes that
                          each call search.core.run_phase with 1 worker, started together on one
                          SQLite storage: they share the phase through the storage alone) ÷ that
                          of 1 runner with 1 worker; the same trials as workers2_over_workers1,
                          each span from the first trial's start to the last one's end
  pipeline_over_floor     the whole default campaign with --set applied (search.core.run_campaign,
                          --workers 2: gradcheck, coarse, fine, confirm, 3 final seeds,
                          dashboard) in a temporary storage, wall time ÷ (updates it trained ×
                          sustained floor ÷ 2 workers), the floor the mean of one just before
                          and one just after the pipeline; needs CIFAR-10 (--data-dir), skipped
                          with --quick
The output also names the BLAS library the step's kernels call (blas: model.blas.SOURCE); the
floor's np.matmul calls NumPy's, the same one unless that is not OpenBLAS.
Without --data-dir (or $CIFAR10_DIR) the data are synthetic uniform pixels of CIFAR-10's
shapes, which time the same; the output says which were used. A new figure is one more measure_*
function called from main() and its rows in ROWS.
"""
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

import numpy as np
import optuna
from numba import njit

from clr_lambda_search.model import blas
from clr_lambda_search.model.dataset import load_cifar10, split_and_normalise
from clr_lambda_search.model.errors import ConfigError, WorkersFailed
from clr_lambda_search.model.network import init_params
# the step's own bf16 kernels, timed apart from the step
from clr_lambda_search.model.step import (_BLOCK_ELEMENTS, StepParams, _backward_bf16, _round_bf16,
                                          gather_batch, make_workspace)
from clr_lambda_search.model.train import evaluation_record, updates
from clr_lambda_search.search.campaign import DEFAULT, Campaign, load_campaign
from clr_lambda_search.search import settings
from clr_lambda_search.search.compare import REEVAL_SEEDS
from clr_lambda_search.search.cli.args import Parser, add_common_args, add_set_arg
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, setup_logging
from clr_lambda_search.search.cli.threads import blas_threads, single_blas_thread
from clr_lambda_search.search.core import dashboard_maker, run_campaign, run_phase
from clr_lambda_search.search.final import current_final
from clr_lambda_search.search.objective import Objective
from clr_lambda_search.search.phases import SearchPhase
from clr_lambda_search.search.samplers import make_pruner
from clr_lambda_search.search.study import campaign_studies, open_storage

CAMPAIGN = load_campaign(DEFAULT)  # the default campaign
COARSE = CAMPAIGN.phase("coarse")   # and its coarse phase
SEARCH_CONFIG = CAMPAIGN.phase_config(COARSE)

N_TRAIN, N_VAL, D, K = 49_000, 1_000, 3072, 10
TRIAL_LAM = 1e-3               # the λ of the timed trial: any value of the coarse range times the same
SIZES = {                      # --quick | full
    "repeats": (20, 60),       # timed blocks of floor, gather and step, interleaved
    "iters": (50, 50),         # calls per timed block
    "trials": (1, 3),          # coarse trials timed
    "worker_trials": (4, 8),   # trials per run of the workers
    "worker_order": ((1, 2), (1, 2, 2, 1)),  # worker counts, one run each
    "worker_n_s": (200, 400),  # half cycle of those trials (one cycle each)
    "wide_repeats": (8, 20),   # timed blocks of floor, gather and step at m = 1024
    "wide_steps": (60, 200),   # steps per process of the processes-vs-threads runs
    "wide_order": ((2, 1), (2, 1, 1, 2)),  # processes of those runs (threads: 2 / processes)
}
WIDE = {"m": 1024, "dropout": 0.5, "flip": True, "shift": 4}  # the wide network's step
WIDE_ITERS = 10                # calls per timed block at m = 1024 (a step is ~15 ms)

# (key, label, unit) of the table, in order; a measurement adds its keys to the results.
ROWS = [
    ("floor_ms", "GEMM floor (X_b W1 + X_bᵀ dH)", "ms"),
    ("gather_ms", "  batch gather alone", "ms"),
    ("step_ms", "training step (sgd_step)", "ms"),
    ("step_over_floor", "step / floor", "×"),
    ("floor_ms_m1024", "GEMM floor at m = 1024", "ms"),
    ("gather_ms_m1024", "  gather with flips and translations", "ms"),
    ("step_ms_m1024", "step, m = 1024, dropout + augmentation", "ms"),
    ("step_over_floor_m1024", "step / floor at m = 1024", "×"),
    ("floor_ms_m1024_t2", "GEMM floor at m = 1024, 2 threads (wall)", "ms"),
    ("step_ms_m1024_t2", "step, m = 1024, 2 threads (wall)", "ms"),
    ("step_over_floor_m1024_t2", "step / floor at m = 1024, 2 threads", "×"),
    ("wide_procs_steps_per_s", "m = 1024: 2 processes × 1 thread", "steps/s"),
    ("wide_threads_steps_per_s", "m = 1024: 1 process × 2 threads", "steps/s"),
    ("wide_procs_over_threads", "2 × 1 thread / 1 × 2 threads", "×"),
    ("eval_ms", "one evaluation (train subset + val)", "ms"),
    ("floor_sustained_ms", "GEMM floor, 3,200 pairs back to back", "ms"),
    ("trial_s", "coarse trial (3,200 steps)", "s"),
    ("trial_cpu_s", "  its CPU time (wall − CPU: waiting)", "s"),
    ("trial_train_s", "  training, evaluations included", "s"),
    ("trial_evals_s", f"    evaluations ({len(SEARCH_CONFIG.eval_steps())} × one)", "s"),
    ("trial_optuna_s", "  Optuna and the storage", "s"),
    ("trial_over_floor", "trial / (3,200 × sustained floor)", "×"),
    ("trial_over_best_floor", "  the same / (3,200 × floor_ms)", "×"),
    ("workers1_trials_per_min", "1 worker", "trials/min"),
    ("workers2_trials_per_min", "2 workers", "trials/min"),
    ("workers2_over_workers1", "2 workers / 1 worker", "×"),
    ("runners1_phase_s", "a search phase: 1 runner × 1 worker (wall)", "s"),
    ("runners2_phase_s", "  2 runners × 1 worker, one storage (wall)", "s"),
    ("runners2_over_runners1", "2 runners / 1 runner (wall time)", "×"),
    ("pipeline_s", "default pipeline, --workers 2 (wall)", "s"),
    ("pipeline_steps", "  updates it trained", ""),
    ("pipeline_floor_ms", "  sustained floor before and after it", "ms"),
    ("pipeline_over_floor", "pipeline / (updates × that floor / 2)", "×"),
    ("pipeline_over_best_floor", "  the same / (updates × floor_ms / 2)", "×"),
    ("pipeline_no_confirm_s", "the same pipeline without its confirm phase (wall)", "s"),
    ("confirm_over_no_confirm", "pipeline with confirm / without", "×"),
]


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats and fewer, shorter worker trials (about half the run time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, params and batches")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10: a cifar-10-batches-py folder, a folder holding it, or "
                        "cifar-10-python.tar.gz (default: $CIFAR10_DIR, else synthetic arrays of "
                        "the same shapes; the benchmark never downloads)")
    p.add_argument("--n-val", type=int, default=N_VAL, help="validation images of CIFAR-10")
    g = p.add_argument_group("--search: the comparison with plain Optuna (search.compare)")
    g.add_argument("--search", action="store_true",
                   help="compare the campaign with TPE and random studies at equal updates")
    g.add_argument("--campaign-seeds", type=int, default=5,
                   help="paired campaign (sampler) seeds: --first-seed, +1, …")
    g.add_argument("--first-seed", type=int, default=0, help="the first campaign seed")
    g.add_argument("--reeval-seeds", type=int, default=len(REEVAL_SEEDS),
                   help=f"fresh training seeds to re-evaluate each pick on ({REEVAL_SEEDS[0]}, …)")
    g.add_argument("--workers", type=int, default=1,
                   help="worker processes (compute is counted in updates: they change the wall "
                        "time only)")
    g.add_argument("--no-final", action="store_true", help="skip the picks' test trainings")
    g.add_argument("--rule", default=None, metavar="PRUNER",
                   help="instead: the campaign's own pruners against this one (e.g. hyperband, "
                        "none) in every search phase, at equal updates per phase (no test "
                        "trainings, no figure)")
    g.add_argument("--storage-dir", default=None,
                   help="keep the studies here, one SQLite file per seed (a rerun resumes them; "
                        "default: a temporary folder)")
    g.add_argument("--out", default="docs/search-comparison.json", help="the numbers (JSON)")
    g.add_argument("--figure", default="docs/search-comparison.png", help="the anytime curve (PNG)")
    p.add_argument("--config", default=DEFAULT,
                   help="the campaign (a file, or a shipped one's name) whose whole pipeline the "
                        "full benchmark times (the other figures time fixed shapes) and which "
                        f"--search compares (default {DEFAULT}; --search compare4: the 4-parameter "
                        "space)")
    add_set_arg(p, "final.seeds=1: a setting of the --config campaign")
    add_common_args(p)
    args = p.parse_args(argv)
    p.require_seed(args, "seed")
    args.campaign = settings.apply(load_campaign(args.config), settings.parse_pairs(args.set))
    if args.search:
        p.require_positive(args, "campaign_seeds", "reeval_seeds", "workers")
        p.require_seed(args, "first_seed", args.campaign_seeds)
        p.require_workers(args)
        for flag, path in (("--out", args.out), ("--figure", args.figure)):
            if not Path(path).resolve().parent.is_dir():
                p.error(f"{flag} {path}: its folder does not exist; create it or choose another")
    return args


def get_data(args, rng):
    """(Dataset, description): CIFAR-10 if a source is given, else synthetic arrays of its shapes."""
    if args.data_dir or os.environ.get("CIFAR10_DIR"):
        data = load_cifar10(args.data_dir, n_val=args.n_val, dtype="float32")
        return data, f"CIFAR-10 ({data.source})"

    def pixels(n):
        return rng.integers(0, 256, (n, D), dtype=np.uint8), rng.integers(0, K, n)
    data = split_and_normalise(*pixels(N_TRAIN + N_VAL), *pixels(N_VAL), N_VAL, "float32",
                               "synthetic")
    return data, "synthetic uniform pixels"


def block_ms(fn, iters, clock=time.thread_time):
    """Mean ms per call of fn() over one block of iters calls, by clock (default: the CPU time
    of this thread)."""
    start = clock()
    for _ in range(iters):
        fn()
    return (clock() - start) / iters * 1e3


def measure_step(data, size, rng, config=SEARCH_CONFIG, repeats=None, iters=None, suffix="",
                 clock=time.thread_time):
    """floor_ms, gather_ms, step_ms (+ suffix) of config's m and regularisers: interleaved timed
    blocks, best of the repeats each. A step is one update of model.train's own loop (updates():
    permutation, schedule, the dropout mask and moves, sgd_step); the gather is timed with the
    moves of the last draw."""
    X, y = data.train.X, data.train.y
    params, ws, steps = _training_loop(data, config, rng)
    batches = _batches(len(y), config.n_batch, rng)
    floor = _gemm_pair(rng, X[:config.n_batch], config.m)

    def gather():
        gather_batch(X, next(batches), ws["X"], data.train.pixels, ws["moves"])

    def step():
        next(steps)

    step()  # compiles the kernels of these regularisers outside the timed blocks
    times = {"floor_ms": [], "gather_ms": [], "step_ms": []}
    for _ in range(repeats or size["repeats"]):
        for key, fn in (("floor_ms", floor), ("gather_ms", gather), ("step_ms", step)):
            times[key].append(block_ms(fn, iters or size["iters"], clock))
    out = {key + suffix: min(v) for key, v in times.items()}
    out["step_over_floor" + suffix] = out["step_ms" + suffix] / out["floor_ms" + suffix]
    return out


def _training_loop(data, config, rng, precision="fp32"):
    """(params, workspace, iterator of updates) of model.train.updates for config at λ =
    TRIAL_LAM, long enough for any benchmark (its CLR schedule is the coarse protocol's)."""
    config = dataclasses.replace(config, lam=TRIAL_LAM, cycles=10_000)
    params = StepParams(init_params(D, config.m, K, rng, dtype=np.float32))
    ws = make_workspace(config.n_batch, D, config.m, K, np.float32, config.dropout, config.flip,
                        config.shift, precision)
    return params, ws, updates(params, data, config, rng, ws)


def measure_wide(data, size, rng):
    """The *_m1024 figures with one BLAS thread (CPU time of this thread) and with two (wall)."""
    config = dataclasses.replace(SEARCH_CONFIG, **WIDE)
    out = {}
    for threads, suffix, clock in ((1, "_m1024", time.thread_time),
                                   (2, "_m1024_t2", time.perf_counter)):
        with blas_threads(threads):
            out.update(measure_step(data, size, rng, config, size["wide_repeats"], WIDE_ITERS,
                                    suffix, clock))
    return out


def measure_procs_vs_threads(data, size):
    """wide_*: steps per second at m = 1024 (dropout, augmentation) of two processes with one
    BLAS thread each and of one process with two threads, in wall time, the same steps per
    process. Forked processes share the data; the kernels were compiled before (measure_wide)."""
    ctx = multiprocessing.get_context("fork")
    seconds = {1: [], 2: []}
    for procs in size["wide_order"]:
        queue = ctx.Queue()
        workers = [ctx.Process(target=_wide_steps,
                               args=(data, size["wide_steps"], 2 // procs, seed, queue))
                   for seed in range(procs)]
        for w in workers:
            w.start()
        try:  # (start, end) of each process's steps, read before join
            spans = [queue.get(timeout=600) for _ in workers]
        except Empty:
            spans = [None]
        for w in workers:
            w.join()
        if any(w.exitcode for w in workers) or None in spans:
            raise WorkersFailed("a benchmark process of the wide step failed")
        seconds[procs].append(max(e for _, e in spans) - min(b for b, _ in spans))
    rate = {n: n * size["wide_steps"] * len(s) / sum(s) for n, s in seconds.items()}
    return {"wide_procs_steps_per_s": rate[2], "wide_threads_steps_per_s": rate[1],
            "wide_procs_over_threads": rate[2] / rate[1]}


def _wide_steps(data, steps, threads, seed, queue):
    """In a forked process: `steps` wide steps with `threads` BLAS threads -> queue (start, end)
    in time.time(), comparable across processes (or None on failure)."""
    try:
        config = dataclasses.replace(SEARCH_CONFIG, **WIDE)
        _, _, loop = _training_loop(data, config, np.random.default_rng(seed))
        with blas_threads(threads):
            start = time.time()
            for _ in range(steps):
                next(loop)
            queue.put((start, time.time()))
    except BaseException:
        queue.put(None)
        raise


def _gemm_pair(rng, Xb=None, m=SEARCH_CONFIG.m):
    """A function running the floor's two GEMMs once at hidden size m, on a batch (random unless
    given)."""
    B = SEARCH_CONFIG.n_batch
    Xb = rng.standard_normal((B, D), dtype=np.float32) if Xb is None else Xb.copy()
    W1 = init_params(D, m, K, rng, dtype=np.float32)["W1"]
    H, dW1 = np.empty((B, m), np.float32), np.empty_like(W1)
    dH = rng.standard_normal((B, m), dtype=np.float32)

    def gemms():
        np.matmul(Xb, W1, out=H)
        np.matmul(Xb.T, dH, out=dW1)
    return gemms


def _batches(N, B, rng):
    """Consecutive batches of a fresh permutation per epoch, like train() (for the gather alone)."""
    while True:
        perm = rng.permutation(N)
        for start in range(0, N, B):
            yield perm[start:start + B]


def measure_eval(data, size, rng):
    """eval_ms: one evaluation point of the coarse protocol (train subset and val)."""
    params = init_params(D, SEARCH_CONFIG.m, K, rng, dtype=np.float32)
    config = dataclasses.replace(SEARCH_CONFIG, lam=TRIAL_LAM)

    def one():
        evaluation_record(params, data, config, config.n_s)
    return {"eval_ms": min(block_ms(one, 1) for _ in range(max(3, size["repeats"] // 3)))}


def measure_trial(data, size, rng, eval_ms):
    """trial_s and trial_over_floor: coarse trials (same λ), study and storage included, each
    after a sustained floor (3,200 GEMM pairs back to back); best of the repeats of each, so
    that both sides of the ratio are long runs measured under the same machine load. The best
    trial is split into training (the Objective's own clock) and the rest.

    trial_cpu_s, the trial's CPU time, tells how much of the wall time a busy machine took away.
    """
    trials, floors = [], []
    gemms = _gemm_pair(rng)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        storage = open_storage(f"sqlite:///{Path(tmp) / 'trial.db'}")
        study = optuna.create_study(study_name="bench-trial", storage=storage, direction="maximize",
                                    pruner=make_pruner("median", SEARCH_CONFIG))
        objective = Objective(data, SEARCH_CONFIG, COARSE.space)
        for _ in range(size["trials"]):
            floors.append(_sustained_floor_s(gemms))
            study.enqueue_trial({"lam": TRIAL_LAM})
            start, cpu = time.perf_counter(), time.thread_time()
            study.optimize(objective, n_trials=1)
            trials.append((time.perf_counter() - start, study.trials[-1].user_attrs["seconds"],
                           time.thread_time() - cpu))
        storage.engine.dispose()
    wall, train_s, cpu_s = min(trials)
    floor_s = min(floors)
    return {"floor_sustained_ms": floor_s / SEARCH_CONFIG.total_steps * 1e3,
            "trial_s": wall, "trial_cpu_s": cpu_s, "trial_train_s": train_s,
            "trial_evals_s": len(SEARCH_CONFIG.eval_steps()) * eval_ms / 1e3,
            "trial_optuna_s": wall - train_s, "trial_over_floor": wall / floor_s}


def _sustained_floor_s(gemms):
    """Wall seconds of a coarse trial's worth of floors: 3,200 GEMM pairs back to back."""
    start = time.perf_counter()
    for _ in range(SEARCH_CONFIG.total_steps):
        gemms()
    return time.perf_counter() - start


def measure_workers(data, size, rng):
    """Trials per minute with 1 and with 2 worker processes, each run on a fresh SQLite study.

    The counts run in the order 1, 2, 2, 1 (1, 2 with --quick) and each count's rate is its
    trials over the sum of its runs' spans, so that a drift of the machine's speed over the
    minute this takes falls on both counts alike. A span runs from the first trial's start to the
    last one's end, as the study records them: process start-up and the runner's polling interval
    stay out of it.
    """
    n_trials = size["worker_trials"]
    spans = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for k, n_workers in enumerate(size["worker_order"]):
            c = _phase_campaign(f"bench-workers{k}", size)
            url = f"sqlite:///{Path(tmp) / f'workers{k}.db'}"
            study, _ = run_phase(c, "coarse", data, open_storage(url), workers=n_workers)
            spans[n_workers].append(_span_s(study, n_trials))
    rates = {n: n_trials * len(s) / sum(s) * 60 for n, s in spans.items()}
    return {"workers1_trials_per_min": rates[1], "workers2_trials_per_min": rates[2],
            "workers2_over_workers1": rates[2] / rates[1]}


def _phase_campaign(name, size):
    """A campaign of one search phase: the coarse phase's space, size["worker_trials"] unpruned
    trials of one cycle of n_s size["worker_n_s"]."""
    phase = SearchPhase(name="coarse", n_trials=size["worker_trials"], space=COARSE.space,
                        sampler="random", pruner="none")
    config = dataclasses.replace(SEARCH_CONFIG, n_s=size["worker_n_s"], cycles=1)
    return Campaign(name=name, phases=(phase,), config=tuple(vars(config).items()))


def measure_runners(data, size):
    """The wall time of one search phase with 2 runners of 1 worker each on one storage ÷ with
    1 runner: the runners are forked processes that each run search.core.run_phase, as two
    shells (or machines) running the same command would; the order is 1, 2, 2, 1 (1, 2 with
    --quick) and each count's figure the sum of its spans."""
    spans = {1: [], 2: []}
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="bench-runners-") as tmp:
        for k, n_runners in enumerate(size["worker_order"]):
            c = _phase_campaign(f"bench-runners{k}", size)
            url = f"sqlite:///{Path(tmp) / f'runners{k}.db'}"
            open_storage(url).engine.dispose()  # tables created before the runners start
            procs = [ctx.Process(target=_runner, args=(c, data, url)) for _ in range(n_runners)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise WorkersFailed(f"benchmark runners exited with {[p.exitcode for p in procs]}")
            study = optuna.load_study(study_name=f"bench-runners{k}-coarse",
                                      storage=open_storage(url))
            spans[n_runners].append(_span_s(study, size["worker_trials"]))
    one, two = sum(spans[1]) / len(spans[1]), sum(spans[2]) / len(spans[2])
    return {"runners1_phase_s": one, "runners2_phase_s": two, "runners2_over_runners1": two / one}


def _runner(campaign, data, url):
    with single_blas_thread():
        run_phase(campaign, "coarse", data, open_storage(url), workers=1)


def _span_s(study, n_trials):
    """Seconds from the first complete trial's start to the last one's end."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE][:n_trials]
    if len(done) < n_trials:
        raise WorkersFailed(f"{study.study_name}: {len(done)} of {n_trials} trials complete")
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return span.total_seconds()


def measure_pipeline(args, rng):
    """pipeline_s, pipeline_steps, pipeline_over_floor: the default campaign through
    search.core.run_campaign (what scripts/pipeline.py calls) with 2 workers in a temporary
    storage; the updates are counted from the studies it wrote. The floor it is divided by is
    the mean of two sustained floors, one just before the pipeline and one just after: the
    machine's speed drifts over minutes here, and a floor taken at another time (the trials')
    moved the ratio by up to ±10%. Then the same campaign without its confirm phase: what
    deciding with confidence costs."""
    gemms = _gemm_pair(rng)
    data = load_cifar10(args.data_dir)
    c = dataclasses.replace(args.campaign, name="bench")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        with single_blas_thread():
            before = _sustained_floor_s(gemms)
            seconds, _ = _timed_campaign(c, data, Path(tmp), "studies.db")
            after = _sustained_floor_s(gemms)
            steps = _trained_steps(open_storage(f"sqlite:///{Path(tmp) / 'studies.db'}"), "bench")
            plain = without_confirm(c)
            no_confirm_s, _ = _timed_campaign(plain, data, Path(tmp), "plain.db")
    floor_ms = (before + after) / 2 / SEARCH_CONFIG.total_steps * 1e3
    return {"pipeline_s": seconds, "pipeline_steps": steps, "pipeline_floor_ms": floor_ms,
            "pipeline_over_floor": seconds / (steps * floor_ms / 1000 / 2),
            "pipeline_no_confirm_s": no_confirm_s,
            "confirm_over_no_confirm": seconds / no_confirm_s}


def _timed_campaign(campaign, data, tmp, db):
    """(wall seconds, CampaignResult) of the whole campaign, dashboard included."""
    storage = open_storage(f"sqlite:///{tmp / db}")
    start = time.perf_counter()
    result = run_campaign(campaign, data, storage, workers=2, out_dir=tmp / f"{db}.out",
                          make_dashboard=dashboard_maker(campaign.name, storage, "bench"))
    return time.perf_counter() - start, result


def without_confirm(campaign):
    """The campaign without its phase named confirm (nothing in dd2424 is derived from it);
    ConfigError when it has none (nothing to compare)."""
    if "confirm" not in [p.name for p in campaign.phases] or campaign.downstream("confirm"):
        raise ConfigError("the campaign has no confirm phase to leave out")
    return dataclasses.replace(campaign, phases=tuple(p for p in campaign.phases
                                                      if p.name != "confirm"))


def _trained_steps(storage, campaign):
    """Updates trained by the campaign's trials, its final run's included: all of a complete
    trial's, a pruned trial's up to its last report."""
    steps = 0
    studies = campaign_studies(storage, campaign) + [current_final(storage, campaign)]
    for study in studies:
        for t in study.trials:
            if t.state == optuna.trial.TrialState.COMPLETE:
                steps += t.user_attrs["steps"] * len(t.user_attrs.get("seeds", [0]))
            elif t.state == optuna.trial.TrialState.PRUNED and t.last_step is not None:
                steps += t.last_step
    return steps


# ---- bf16 (TrainConfig.precision): a self-contained measurement, one call from main() -------

BF16_ROWS = [
    ("bf16_floor_ms_m1024", "bf16: the two GEMMs in bf16, m = 1024", "ms"),
    ("bf16_fp32_floor_ms_m1024", "  the same two GEMMs in fp32 (NumPy's BLAS)", "ms"),
    ("bf16_gemm_over_fp32_gemm_m1024", "  bf16 GEMMs / fp32 GEMMs (< 1: native bf16)", "×"),
    ("bf16_step_ms_m1024", "bf16 step, m = 1024, dropout + augmentation", "ms"),
    ("bf16_step_over_floor_m1024", "bf16 step / its bf16 floor at m = 1024", "×"),
    ("bf16_over_fp32_step_m1024", "bf16 step / fp32 step at m = 1024", "×"),
    ("bf16_copy_pass_ms_m1024", "  one separate pass W1 → bf16 (what the step avoids)", "ms"),
    ("bf16_backward_blocked_extra_ms_m1024", "  blocked backward + copy − one backward GEMM", "ms"),
    ("bf16_backward_then_pass_extra_ms_m1024", "  one backward GEMM + a pass − the GEMM alone", "ms"),
    ("bf16_outside_gemms_ms_m50", "bf16 step − its bf16 floor at m = 50", "ms"),
    ("fp32_outside_gemms_ms_m50", "fp32 step − its fp32 floor at m = 50", "ms"),
    ("bf16_outside_minus_fp32_ms_m50", "  bf16's time outside the GEMMs − fp32's", "ms"),
    ("bf16_over_fp32_step_m50", "bf16 step / fp32 step at m = 50", "×"),
]
ROWS += BF16_ROWS


def measure_bf16(data, size, rng):
    """bf16_*: the bf16 step (model.train.updates with precision "bf16") against its own floor
    (the step's two products with bf16 operands, through the kernels' bf16 GEMM) and against the
    fp32 step and floor (NumPy's BLAS, also called from compiled code), measured here in
    interleaved blocks, CPU time of this thread, best of the repeats; at m = 1024 with dropout
    0.5, flips and ±4-pixel moves, and at m = 50 (the search protocol). Also the cost of W1's
    bf16 copy: a separate rounding pass over W1, and what the backward product in blocks with
    the copy written per block costs beyond one backward GEMM. Where bf16 cannot run,
    {"bf16": why}."""
    from clr_lambda_search.model.precision import bf16_missing

    missing = bf16_missing()
    if missing:
        return {"bf16": f"not measured: {missing}"}
    wide = _bf16_figures(data, rng, dataclasses.replace(SEARCH_CONFIG, **WIDE),
                         size["wide_repeats"], WIDE_ITERS)
    narrow = _bf16_figures(data, rng, SEARCH_CONFIG, size["repeats"], size["iters"])
    return {
        "bf16_library": " ".join(blas.load_bf16()),
        "bf16_floor_ms_m1024": wide["floor16"], "bf16_fp32_floor_ms_m1024": wide["floor32"],
        "bf16_gemm_over_fp32_gemm_m1024": wide["floor16"] / wide["floor32"],
        "bf16_step_ms_m1024": wide["step16"],
        "bf16_step_over_floor_m1024": wide["step16"] / wide["floor16"],
        "bf16_over_fp32_step_m1024": wide["step16"] / wide["step32"],
        "bf16_copy_pass_ms_m1024": wide["copy"],
        "bf16_backward_blocked_extra_ms_m1024": wide["blocked"] - wide["backward"],
        "bf16_backward_then_pass_extra_ms_m1024": wide["then_pass"] - wide["backward"],
        "bf16_outside_gemms_ms_m50": narrow["step16"] - narrow["floor16"],
        "fp32_outside_gemms_ms_m50": narrow["step32"] - narrow["floor32"],
        "bf16_outside_minus_fp32_ms_m50": (narrow["step16"] - narrow["floor16"])
                                           - (narrow["step32"] - narrow["floor32"]),
        "bf16_over_fp32_step_m50": narrow["step16"] / narrow["step32"],
    }


def _bf16_figures(data, rng, config, repeats, iters):
    """Best ms per call of: both steps (step16, step32), both floors (floor16, floor32), the
    bf16 backward product alone (backward), in blocks with the copy (blocked), whole and then
    the copy in a pass of its own (then_pass), and that rounding pass alone (copy)."""

    _, _, loop16 = _training_loop(data, config, rng, "bf16")
    _, _, loop32 = _training_loop(data, config, rng, "fp32")
    B, m = config.n_batch, config.m
    X = np.ascontiguousarray(data.train.X[:B])
    W1 = init_params(D, m, K, rng, dtype=np.float32)["W1"]
    dH = rng.standard_normal((B, m), dtype=np.float32) * 1e-3
    X16, W16, dH16 = (np.empty(a.shape, np.uint16) for a in (X, W1, dH))
    for a, a16 in ((X, X16), (W1, W16), (dH, dH16)):
        _round_bf16(a, a16)
    H = np.empty((B, m), np.float32)
    packed = blas.packed_b_bf16(D, m, B)
    fns = {
        "step16": lambda: next(loop16), "step32": lambda: next(loop32),
        "floor16": lambda: _bf16_floor(X16, W16, H, dH16, W1),
        "floor32": lambda: _fp32_floor(X, W1, H, dH),
        "backward": lambda: _bf16_backward(X16, dH16, W1),
        "blocked": lambda: _backward_bf16(X16, dH16, packed, W1, W16, _BLOCK_ELEMENTS),
        "then_pass": lambda: _bf16_backward_then_pass(X16, dH16, W1, W16),
        "copy": lambda: _round_bf16(W1, W16),
    }
    for fn in fns.values():
        fn()  # compiled and warm outside the timed blocks
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(block_ms(fn, iters))
    return {k: min(v) for k, v in times.items()}


@njit  # no disk cache: a script's module name differs by how it is run
def _bf16_floor(X16, W16, H, dH16, W1):
    """The step's two products with bf16 operands: H ← X_b W1, W1 ← W1 + X_bᵀ dH (β = 1)."""
    blas.gemm_bf16(X16, W16, H, 1.0, 0.0, False, 0, H.shape[0])
    blas.gemm_bf16(X16, dH16, W1, 1.0, 1.0, True, 0, W1.shape[0])


@njit  # no disk cache: a script's module name differs by how it is run
def _bf16_backward(X16, dH16, W1):
    """W1 ← W1 + X_bᵀ dH with bf16 operands, in one product."""
    blas.gemm_bf16(X16, dH16, W1, 1.0, 1.0, True, 0, W1.shape[0])


@njit  # no disk cache: a script's module name differs by how it is run
def _bf16_backward_then_pass(X16, dH16, W1, W16):
    """_bf16_backward, then W16 ← bf16(W1) in a pass of its own (what the step avoids)."""
    blas.gemm_bf16(X16, dH16, W1, 1.0, 1.0, True, 0, W1.shape[0])
    _round_bf16(W1, W16)


@njit  # no disk cache: a script's module name differs by how it is run
def _fp32_floor(X, W1, H, dH):
    """The same two products in fp32, through the kernels' BLAS (NumPy's), from compiled code
    as the step calls them."""
    blas.gemm(X, W1, H, 1.0, 0.0)
    blas.gemm(X, dH, W1, 1.0, 1.0, trans_a=True)


def table(results):
    head = (f"data: {results['data']}; one BLAS thread (but where 2 are named), float32"
            f"{'; --quick' if results['quick'] else ''}"
            f"\nthe step's BLAS: {results['blas']} (the floor's: NumPy's)"
            + (f"; its bf16 GEMM: {results['bf16_library']}" if "bf16_library" in results else ""))
    lines = [f"{label:<38} {results[key]:>9.3f} {unit}" for key, label, unit in ROWS if key in results]
    return "\n".join([head, *lines, *([f"bf16: {results['bf16']}"] if "bf16" in results else [])])


def search_main(args):
    """--search: the comparison, its JSON and its figure."""
    from clr_lambda_search.search import compare

    if not (args.data_dir or os.environ.get("CIFAR10_DIR")):
        raise ConfigError("the search comparison needs CIFAR-10: give --data-dir DIR or set "
                          "CIFAR10_DIR")
    c = args.campaign
    data = load_cifar10(args.data_dir, n_val=args.n_val, dtype="float32")
    seeds = range(args.first_seed, args.first_seed + args.campaign_seeds)
    reeval = tuple(REEVAL_SEEDS[0] + i for i in range(args.reeval_seeds))
    def write_json(result):  # after every seed: a long run that stops early keeps what it measured
        result.update(data=f"CIFAR-10 ({data.source})", command=" ".join(sys.argv))
        Path(args.out).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")

    def save(result):
        write_json(result)
        compare.plot_anytime(result, args.figure)

    with tempfile.TemporaryDirectory() as tmp:
        if args.rule is not None:
            result = compare.compare_rule(data, campaign=c, rule=args.rule, seeds=seeds,
                                          reeval_seeds=reeval, storage_dir=args.storage_dir or tmp,
                                          workers=args.workers, on_seed=write_json)
            emit(result, args, rule_table(result))
            return 0
        result = compare.compare(data, campaign=c, seeds=seeds, reeval_seeds=reeval,
                                 storage_dir=args.storage_dir or tmp, workers=args.workers,
                                 final=not args.no_final, on_seed=save)
    emit(result, args, search_table(result))
    return 0


def rule_table(result):
    """--rule's lines: each run, then the paired difference."""
    lines = [f"{r['method']:>4} seed {r['seed']}: {r['trials']} trials ({r['pruned']} pruned), "
             f"{r['updates']:,.0f} updates, re-evaluated val {r['reeval_val']:.4f}"
             for r in result["runs"]]
    d = result["differences"]["rule-own:reeval_val"]
    ci = (f" [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]" if d["ci95"] else "")
    return "\n".join(lines + [f"{result['rule']} − own ({result['own_pruners']}): "
                              f"{100 * d['mean']:+.2f} points{ci} (95% CI, {d['n']} paired seeds)"])


def search_table(result):
    s = result["summary"]
    lines = [f"{'method':<8} {'updates':>9} {'re-eval val':>11} {'test':>7}"]
    for m in s:
        lines.append(f"{m:<8} {s[m]['updates_mean']:>9.0f} {100 * s[m]['reeval_val_mean']:>10.2f}%"
                     + (f" {100 * s[m]['test_acc_mean']:>6.2f}%" if "test_acc_mean" in s[m] else ""))
    for name, d in result["differences"].items():
        ci = "n/a" if d["ci95"] is None else \
            f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
        lines.append(f"{name:<28} {100 * d['mean']:+.2f} points, 95% CI {ci}")
    return "\n".join(lines)


def main():
    args = parse_args()
    setup_logging(args)
    if args.search:
        return search_main(args)
    size = {k: v[0 if args.quick else 1] for k, v in SIZES.items()}
    rng = np.random.default_rng(args.seed)
    data, described = get_data(args, rng)
    results = {"data": described, "quick": args.quick, "blas": blas.SOURCE}
    with single_blas_thread():
        results.update(measure_step(data, size, rng))
        results.update(measure_eval(data, size, rng))
        results.update(measure_trial(data, size, rng, results["eval_ms"]))
        results["trial_over_best_floor"] = results["trial_s"] * 1e3 / (
            SEARCH_CONFIG.total_steps * results["floor_ms"])
        results.update(measure_bf16(data, size, rng))
    results.update(measure_wide(data, size, rng))  # one thread, then two
    results.update(measure_procs_vs_threads(data, size))
    results.update(measure_workers(data, size, rng))  # each worker pins its own BLAS threads
    results.update(measure_runners(data, size))
    if not args.quick and data.source != "synthetic":
        results.update(measure_pipeline(args, rng))
        results["pipeline_over_best_floor"] = results["pipeline_s"] * 1e3 / (
            results["pipeline_steps"] * results["floor_ms"] / 2)
    emit({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()},
                 args, table(results))
    return 0


if __name__ == "__main__":
    run(main)

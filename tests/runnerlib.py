"""Several `scripts/pipeline.py` of ONE campaign against ONE storage, and what their studies must
hold afterwards: exactly what one runner leaves (test_runners.py, test_old_storage.py).

Running: `start_pipeline` starts a pipeline as users do (its stdout and stderr go to files, so a
chatty runner never blocks on a full pipe); `wait_all` waits for the runners and returns a Run per
runner (exit code, the one JSON line of --json, stderr).

Checking: every `check_*` function reads the storage with Optuna itself (faultlib.load_trials:
no heartbeat, no code under test) and returns a list of problems, one sentence each, [] when all
is well; `assert_no_problems` fails a test with all of them at once, so that one run lists every
broken guarantee, not just the first. `campaign_problems` runs them all on a finished campaign.

The checks rely on these records of the studies (today's names; a rewrite that renames one must
rename it here too):
- every phase study: user attrs "space" ([{name, low, high, log}]); the narrowed one also
  "narrowed" ({"from_study", "from_trials", "top_k", "margin", ...});
- the confirm study: trial user attrs "candidate" (index) and "confirm_seed", study user attrs
  "candidates", "confirm_seeds" and "verdict" ({"scores": {candidate: [value per seed]}, ...});
- the final study <campaign>-final: one trial per seed, user attr "seed", value the test accuracy.
"""
import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

import faultlib as fl
from clr_lambda_search.search import record

PIPELINE = fl.REPO / "scripts" / "pipeline.py"

# A tiny campaign of the shipped dd2424 file on the tiny CIFAR-10 (conftest.write_tiny_cifar:
# 180 train / 20 val images with --n-val 20): a trial is ~0.1 s, the whole pipeline with one
# runner ~20 s (most of it start-up and the dashboard). No pruner: a pruned trial would blur
# "surplus trials are at most one per extra runner".
N_COARSE, N_FINE, N_SEEDS = 4, 3, 2
TOP_K, MARGIN = 3, 0.25               # dd2424.toml: fine narrows the best 3 coarse trials ± 0.25
CONFIRM_TOP_K, CONFIRM_SEEDS = 3, 5   # dd2424.toml: confirm races the best 3 on 5 seeds
TINY_PIPELINE = ["--coarse-trials", N_COARSE, "--fine-trials", N_FINE, "--search-n-s", 20,
                 "--search-cycles", 1, "--final-n-s", 20, "--final-cycles", 1, "--seeds", N_SEEDS,
                 "--n-val", 20, "--pruner", "none", "--workers", 1, "--json"]
SEARCH_PHASES = ("coarse", "fine")
PENDING = (TrialState.WAITING, TrialState.RUNNING)


def pipeline_args(storage, campaign, data_dir, out_dir, flags=TINY_PIPELINE):
    return [str(a) for a in ("--storage", storage, "--campaign", campaign, "--data-dir", data_dir,
                             "--out-dir", out_dir, *flags)]


@dataclass
class Runner:
    """A started pipeline: its process and the files its output goes to."""

    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    name: str


@dataclass
class Run:
    """A finished runner: exit code, its --json summary (None unless exactly one JSON line)."""

    name: str
    returncode: int
    summary: dict
    stdout: str
    stderr: str

    def tail(self, n=1500):
        return f"{self.name} exited {self.returncode}; stderr ends:\n{self.stderr[-n:]}"


def start_pipeline(args, env, log_dir, name):
    """scripts/pipeline.py ARGS in the background (cwd = repo root); output to log_dir/name.*"""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(fl.script_command(PIPELINE, args), cwd=fl.REPO,
                                env=env, stdout=o, stderr=e, text=True)
    return Runner(proc, out, err, name)


def start_runners(n, args_of, env, log_dir):
    """n pipelines started at once; args_of(i) gives runner i's arguments."""
    return [start_pipeline(args_of(i), env, log_dir, f"runner{i}") for i in range(n)]


def finished(runner):
    """The Run of a runner that has exited."""
    stdout, stderr = runner.stdout.read_text(), runner.stderr.read_text()
    lines = stdout.strip().splitlines()
    summary = None
    if len(lines) == 1:
        try:
            summary = json.loads(lines[0])
        except json.JSONDecodeError:
            pass
    return Run(runner.name, runner.proc.returncode, summary, stdout, stderr)


def wait_all(runners, timeout):
    """Wait for every runner (all of them share one deadline); a runner still running at the
    deadline is killed and reported with return code None. Returns [Run]."""
    deadline = time.monotonic() + timeout
    timed_out = set()
    for r in runners:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out.add(r.name)
            r.proc.kill()
            r.proc.wait()
    runs = [finished(r) for r in runners]
    for run in runs:
        if run.name in timed_out:
            run.returncode = None
            run.stderr += f"\n[runnerlib: still running after {timeout} s, killed]"
    return runs


def kill_all(runners):
    """Test clean-up: kill the runners that still run."""
    for r in runners:
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait()


# ---- reading the storage ------------------------------------------------------------------------

def campaign_study_names(url, campaign):
    return [n for n in fl.study_names(url) if n.startswith(f"{campaign}-")]


def final_name(url, campaign):
    """The study of the campaign's current final run (search.final.current_final), or None."""
    from clr_lambda_search.search.final import current_final

    current = current_final(optuna.storages.RDBStorage(url), campaign)
    return current.study_name if current else None


def campaign_study_names_phases(url, campaign):
    """The phases (name suffixes) of the campaign's studies, e.g. ["coarse", "confirm", ...]."""
    return [n[len(campaign) + 1:] for n in campaign_study_names(url, campaign)]


def load(url, campaign, phase):
    """(trials, user attrs) of <campaign>-<phase>, or (None, None) when there is no such study."""
    name = f"{campaign}-{phase}"
    if name not in fl.study_names(url):
        return None, None
    return fl.load_trials(url, name)


def delete_campaign(url, campaign):
    """Drop every study of the campaign (a PostgreSQL database outlives the test)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        for name in campaign_study_names(url, campaign):
            optuna.delete_study(study_name=name, storage=storage)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _states(trials):
    counts = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _described(trials):
    return [(t.number, t.state.name, t.params, t.user_attrs.get("failure")) for t in trials]


# ---- the checks ---------------------------------------------------------------------------------

def check_exits(runs):
    """Every run exited 0 with one JSON line on stdout."""
    problems = []
    for run in runs:
        if run.returncode != 0:
            problems.append(f"{run.name} exited {run.returncode}, not 0: "
                            f"{_last_lines(run.stderr)}")
        elif run.summary is None:
            problems.append(f"{run.name} exited 0 without exactly one JSON line on stdout: "
                            f"{run.stdout[-300:]!r}")
    return problems


def _last_lines(text, n=3):
    lines = fl.stderr_lines(text)
    return " | ".join(lines[-n:]) if lines else "(no stderr)"


def check_search_phase(url, campaign, phase, n_trials, runners, killed=0):
    """The search phase's study holds exactly n_trials COMPLETE trials with distinct parameters;
    the others (surplus trials of racing runners, and the trials of killed runners) are at most
    (runners - 1) + killed, none COMPLETE, none WAITING or RUNNING; FAIL only for a killed one or a
    surplus one (recorded as such, never trained)."""
    trials, _ = load(url, campaign, phase)
    name = f"{campaign}-{phase}"
    if trials is None:
        return [f"{name}: no such study"]
    problems = []
    done = fl.complete(trials)
    if len(done) != n_trials:
        problems.append(f"{name}: {len(done)} COMPLETE trials, not {n_trials} "
                        f"(states {_states(trials)})")
    dups = fl.duplicated_lams(trials)
    if dups:
        problems.append(f"{name}: parameters trained twice by COMPLETE trials: {dups}")
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    allowed = (runners - 1) + killed
    if len(others) > allowed:
        problems.append(f"{name}: {len(others)} trials not COMPLETE, more than the {allowed} "
                        f"surplus/killed ones {runners} runners ({killed} killed) may leave: "
                        f"{_described(others)}")
    # surplus trials are recorded FAIL with their reason (search.record.SURPLUS), untrained
    failed = [t for t in trials if t.state == TrialState.FAIL and not record.is_bookkeeping(t)]
    if len(failed) > killed:
        problems.append(f"{name}: {len(failed)} FAIL trials, {killed} runner(s) killed: "
                        f"{_described(failed)}")
    return problems


def check_budget_phase(url, campaign, phase, amount, trial_updates, runners):
    """The phase that ended on its budget of `amount` updates: its trials charged at least that
    and less than one trial's updates more, however many runners raced for it; each trained
    trial COMPLETE, in full, with parameters of its own; nothing else but the untrained surplus
    trials of racing runners (at most one per runner besides the first)."""
    from clr_lambda_search.search.budget import spent

    trials, _ = load(url, campaign, phase)
    name = f"{campaign}-{phase}"
    if trials is None:
        return [f"{name}: no such study"]
    problems = []
    charged = spent(trials, "updates")
    if not amount <= charged < amount + trial_updates:
        problems.append(f"{name}: {charged:g} updates charged for a budget of {amount:g}, not "
                        f"less than one trial ({trial_updates}) over it (states {_states(trials)})")
    trained = [t for t in trials if not record.is_bookkeeping(t)]
    wrong = [t for t in trained if t.state != TrialState.COMPLETE
             or t.user_attrs.get("updates") != trial_updates]
    if wrong:
        problems.append(f"{name}: trials not COMPLETE in full: {_described(wrong)}")
    if len(trials) - len(trained) > runners - 1:
        problems.append(f"{name}: {len(trials) - len(trained)} surplus trials from {runners} "
                        f"runners")
    dups = fl.duplicated_lams(trials)
    if dups:
        problems.append(f"{name}: parameters trained twice by COMPLETE trials: {dups}")
    return problems


def expected_narrowed(source_space, values, margin):
    """The narrowed range of each log/linear float parameter of source_space ([{name, low, high,
    log}]) around values ({name: [the best trials' values]}): from the smallest to the largest
    value, ± margin decades (log) or margin × the span (linear), clipped to the source range.
    Written out here, independently of search.space.narrow."""
    out = {}
    for p in source_space:
        vs = values[p["name"]]
        if p.get("log"):
            low = max(p["low"], 10 ** (min(math.log10(v) for v in vs) - margin))
            high = min(p["high"], 10 ** (max(math.log10(v) for v in vs) + margin))
        else:
            pad = margin * (p["high"] - p["low"])
            low, high = max(min(vs) - pad, p["low"]), min(max(vs) + pad, p["high"])
        out[p["name"]] = (low, high)
    return out


def check_narrowed(url, campaign, runs=(), top_k=TOP_K, margin=MARGIN, source="coarse",
                   phase="fine"):
    """The narrowed study recorded one derived range: its "narrowed" attr names top_k COMPLETE
    trials of the source study whose values are the source's top_k values at its end (ties may
    pick either trial of a tie), its "space" is the span of those trials (expected_narrowed), every
    trial of it sampled inside that space, and every runner's --json reports that same space and
    derivation."""
    src_trials, src_attrs = load(url, campaign, source)
    trials, attrs = load(url, campaign, phase)
    name = f"{campaign}-{phase}"
    if trials is None or src_trials is None:
        return [f"{name} or its source {campaign}-{source}: no such study"]
    problems = []
    info, space = attrs.get("narrowed"), attrs.get("space")
    if not isinstance(info, dict) or not space:
        return [f"{name}: no derived range recorded (user attrs narrowed={info!r}, space={space!r})"]
    if info.get("from_study") != f"{campaign}-{source}":
        problems.append(f"{name}: narrowed from {info.get('from_study')!r}, not {campaign}-{source}")
    by_number = {t.number: t for t in src_trials}
    picked = [by_number.get(n) for n in info.get("from_trials") or []]
    if len(picked) != top_k or any(t is None or t.state != TrialState.COMPLETE for t in picked):
        problems.append(f"{name}: derived from trials {info.get('from_trials')} of {source}, not "
                        f"{top_k} COMPLETE ones")
        return problems
    top_values = sorted((t.value for t in fl.complete(src_trials)), reverse=True)[:top_k]
    if sorted((t.value for t in picked), reverse=True) != top_values:
        problems.append(f"{name}: derived from {source} trials {info['from_trials']} (values "
                        f"{[t.value for t in picked]}), not {source}'s final top {top_k} "
                        f"(values {top_values}): the range came from an unfinished {source}")
    want = expected_narrowed(src_attrs["space"],
                             {p["name"]: [t.params[p["name"]] for t in picked]
                              for p in src_attrs["space"]}, margin)
    got = {p["name"]: (p["low"], p["high"]) for p in space}
    if set(got) != set(want) or any(not (math.isclose(got[k][0], want[k][0], rel_tol=1e-9)
                                         and math.isclose(got[k][1], want[k][1], rel_tol=1e-9))
                                    for k in want):
        problems.append(f"{name}: recorded space {got}, the span of trials {info['from_trials']} "
                        f"of {source} is {want}")
    outside = [(t.number, t.params) for t in trials if t.params and any(
        not (got[k][0] <= t.params[k] <= got[k][1]) for k in got if k in t.params)]
    if outside:
        problems.append(f"{name}: trials sampled outside the recorded space {got}: {outside}")
    for run in runs:
        if run.summary is None:
            continue
        reported = [ph for ph in run.summary.get("phases", []) if ph.get("study") == name]
        if not reported or reported[0].get("space") != space or reported[0].get("narrowed") != info:
            problems.append(f"{name}: {run.name} reports another range than the recorded one: "
                            f"{reported[0] if reported else None}")
    return problems


def check_confirm(url, campaign, phase="confirm", top_k=CONFIRM_TOP_K, n_seeds=CONFIRM_SEEDS):
    """The confirm study holds exactly one COMPLETE trial per (candidate, seed) pair its verdict
    scored, with that score, and no other COMPLETE trial (no pair trained twice)."""
    trials, attrs = load(url, campaign, phase)
    name = f"{campaign}-{phase}"
    if trials is None:
        return [f"{name}: no such study"]
    problems = []
    have = {}
    for t in fl.complete(trials):
        key = (t.user_attrs.get("candidate"), t.user_attrs.get("confirm_seed"))
        have.setdefault(key, []).append(t)
    dups = {k: [t.number for t in ts] for k, ts in have.items() if len(ts) > 1}
    if dups:
        problems.append(f"{name}: (candidate, seed) pairs with several COMPLETE trials: {dups}")
    cands, seeds, verdict = (attrs.get("candidates"), attrs.get("confirm_seeds"),
                             attrs.get("verdict"))
    if not isinstance(verdict, dict):
        return problems + [f"{name}: no verdict recorded (states {_states(trials)})"]
    if not cands or len(cands) != top_k or not seeds or len(seeds) != n_seeds:
        problems.append(f"{name}: {len(cands or [])} candidates on {len(seeds or [])} seeds, not "
                        f"{top_k} on {n_seeds}")
    wanted = {}
    for c, scores in verdict.get("scores", {}).items():
        for seed, value in zip(seeds or [], scores):
            wanted[(int(c), seed)] = value
    extra = sorted(set(have) - set(wanted), key=str)
    missing = sorted(set(wanted) - set(have), key=str)
    if extra:
        problems.append(f"{name}: COMPLETE trials of pairs the verdict did not score: "
                        f"{ {k: [t.number for t in have[k]] for k in extra} }")
    if missing:
        problems.append(f"{name}: pairs the verdict scored without a COMPLETE trial: {missing}")
    wrong = {k: (wanted[k], [t.value for t in have[k]]) for k in set(have) & set(wanted)
             if any(t.value != wanted[k] for t in have[k])}
    if wrong:
        problems.append(f"{name}: verdict scores differ from the trials' values: {wrong}")
    for t in fl.complete(trials):
        c = t.user_attrs.get("candidate")
        if cands and isinstance(c, int) and 0 <= c < len(cands) and t.params != cands[c]["params"]:
            problems.append(f"{name}: trial {t.number} of candidate {c} trained {t.params}, not "
                            f"{cands[c]['params']}")
    return problems


def check_final(url, campaign, n_seeds=N_SEEDS, runs=()):
    """The final study holds exactly one COMPLETE trial per final seed 0..n_seeds-1 and nothing
    else but the untrained surplus trials of racing seed processes (FAIL, recorded as such:
    Optuna's ask() makes a trial when the queued one was taken a moment before; at most one per
    process that found nothing left to claim), its pick is the one the runners report, and its
    values are their test accuracies."""
    name = final_name(url, campaign)
    trials, attrs = fl.load_trials(url, name) if name else (None, None)
    name = name or f"{campaign}-final"
    if trials is None:
        return [f"{name}: no such study"]
    problems = []
    seeds = sorted(t.user_attrs.get("seed") for t in fl.complete(trials))
    if seeds != list(range(n_seeds)):
        problems.append(f"{name}: COMPLETE trials of seeds {seeds}, not one each of "
                        f"{list(range(n_seeds))} (states {_states(trials)})")
    others = [t for t in trials if t.state != TrialState.COMPLETE and not (
        t.state == TrialState.FAIL and record.is_bookkeeping(t) and not t.intermediate_values)]
    surplus = len(trials) - len(fl.complete(trials)) - len(others)
    if others or surplus > n_seeds * max(1, len(runs) - 1):
        problems.append(f"{name}: trials not COMPLETE: {_described(others)} ({surplus} surplus)")
    by_seed = {t.user_attrs.get("seed"): t.value for t in fl.complete(trials)}
    for run in runs:
        if run.summary is None:
            continue
        final = run.summary.get("final") or {}
        if final.get("params") != attrs.get("pick"):
            problems.append(f"{name}: pick {attrs.get('pick')}, {run.name} reports "
                            f"{final.get('params')}")
        if final.get("test_acc") != [by_seed.get(s) for s in range(n_seeds)]:
            problems.append(f"{name}: test accuracies by seed {by_seed}, {run.name} reports "
                            f"{final.get('test_acc')}")
    return problems


def check_nothing_pending(url, campaign):
    """No trial of any study of the campaign is left WAITING or RUNNING."""
    problems = []
    for name in campaign_study_names(url, campaign):
        trials, _ = fl.load_trials(url, name)
        pending = [(t.number, t.state.name, t.params) for t in trials if t.state in PENDING]
        if pending:
            problems.append(f"{name}: {len(pending)} trial(s) left WAITING/RUNNING: {pending}")
    return problems


def check_studies(url, campaign, phases=(*SEARCH_PHASES, "confirm", "final")):
    """The campaign has exactly the studies of its phases and its final run (and any it retired:
    kept under <study>.retired-<k>, out of the campaign; final versions it replaced, marked
    retired under their names)."""
    current = final_name(url, campaign)
    names = [f"{campaign}-final" if n == current else n for n in campaign_study_names(url, campaign)
             if ".retired-" not in n and not (n.startswith(f"{campaign}-final") and n != current
                                                and fl.load_trials(url, n)[1].get("retired"))]
    want = sorted(f"{campaign}-{p}" for p in phases)
    return [] if sorted(names) == want else [f"campaign studies {sorted(names)}, not {want}"]


def check_agree(runs):
    """The runners' --json outputs agree on the verdict, the final params and the final per-seed
    test accuracies."""
    with_summary = [r for r in runs if r.summary is not None]
    problems = []
    for key, get in (("verdict", lambda s: s.get("verdict")),
                     ("final params", lambda s: (s.get("final") or {}).get("params")),
                     ("final test accuracies", lambda s: (s.get("final") or {}).get("test_acc"))):
        values = {r.name: get(r.summary) for r in with_summary}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            problems.append(f"runners disagree on the {key}: {values}")
    return problems


def campaign_problems(url, campaign, runs, runners, killed=0, n_coarse=N_COARSE, n_fine=N_FINE,
                      n_seeds=N_SEEDS):
    """Every check on a finished campaign that `runners` pipelines ran, `killed` of them
    SIGKILLed. runs: the Runs of the runners that were not killed (each must exit 0)."""
    return (check_exits(runs)
            + check_studies(url, campaign)
            + check_search_phase(url, campaign, "coarse", n_coarse, runners, killed)
            + check_search_phase(url, campaign, "fine", n_fine, runners, killed)
            + check_narrowed(url, campaign, runs)
            + check_confirm(url, campaign)
            + check_final(url, campaign, n_seeds, runs)
            + check_nothing_pending(url, campaign)
            + check_agree(runs))


def assert_no_problems(problems, runs=()):
    """Fail with every problem found (and the end of each runner's stderr)."""
    if problems:
        details = "\n".join(f"- {p}" for p in problems)
        tails = "\n\n".join(r.tail() for r in runs if r.returncode != 0)
        raise AssertionError(f"{len(problems)} problem(s):\n{details}"
                             + (f"\n\n{tails}" if tails else ""))


def env_for(tmp):
    """faultlib.script_env: the caller's environment minus $CIFAR10_*, cache in tmp."""
    env = fl.script_env(tmp)
    env.pop("OPTUNA_STORAGE", None)
    return env


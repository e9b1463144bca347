"""The service against a plain Optuna study at equal compute (issue 22, item 5).

    result = compare(data, seeds=range(5), storage_dir="studies/compare", workers=2)

For each paired campaign seed s (the studies' sampler seed):
  service  the campaign's search phases (dd2424: coarse → narrowed fine → confirm) through
           search.core.run_phase; its pick is the confirm verdict's; it spends B updates (every
           trial's `updates` attr: pruned and confirm trainings included)
  tpe      one study over the first phase's space with optuna.samplers.TPESampler(seed=s) and
           no pruner, what a user's own script does, given `budget = "B updates"`; its best trial
  random   the same with optuna.samplers.RandomSampler(seed=s)
Every method's pick, and every distinct incumbent on the way (for the anytime curve), is trained
again on fresh seeds (REEVAL_SEEDS) under the search protocol and scored by its mean validation
accuracy; each pick is trained once under the final protocol and tested. A budget phase stops at
the first trial that reaches its budget, so a baseline spends B rounded up to whole trials: at
most one trial more than the service (recorded per run).
"""
import dataclasses
import json
import logging
import math
import multiprocessing
import signal
from pathlib import Path

import numpy as np
import optuna

from clr_lambda_search.model.train import fit
from clr_lambda_search.search import budget, core, record, settings
from clr_lambda_search.search.budget import Budget
from clr_lambda_search.search.campaign import load_campaign, validated
from clr_lambda_search.search.confirm import ttest_rel
from clr_lambda_search.search.final import train_seed
from clr_lambda_search.search.phases import SearchPhase, pinned
from clr_lambda_search.search.samplers import pruner_label
from clr_lambda_search.search.study import open_storage

log = logging.getLogger(__name__)

METHODS = ("service", "tpe", "random")
BASELINES = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
REEVAL_SEEDS = (2000, 2001, 2002)
FINAL_SEED = 0
MAX_TRIALS = 10_000  # a baseline ends by its budget; this only bounds it


def compare(data, *, campaign="dd2424", overrides=None, seeds=range(5), reeval_seeds=REEVAL_SEEDS,
            storage_dir, workers=1, final=True, progress=None, on_seed=None):
    """Run the comparison; returns {"runs", "differences", "summary", "anytime", ...} (see
    module docstring). storage_dir holds one SQLite storage per campaign seed (a rerun resumes
    its studies) and trained.json (its re-evaluations and tests: a rerun reads them).
    progress: optional callable(study_name, done, total, unit) of the phases.
    on_seed: optional callable(result so far), called as each campaign seed is done (all its
    methods run, re-evaluated and tested)."""
    base = settings.apply(load_campaign(campaign) if isinstance(campaign, str) else campaign,
                          overrides)
    Path(storage_dir).mkdir(parents=True, exist_ok=True)
    scorer = Scorer(base, data, reeval_seeds, workers, cache=Path(storage_dir) / "trained.json")
    runs, done = [], []
    for s in seeds:
        storage = open_storage(f"sqlite:///{Path(storage_dir) / f'seed{s}.db'}")
        service = run_service(base, s, data, storage, workers, progress)
        these = [service] + [run_baseline(base, m, s, service["updates"], data, storage,
                                          workers, progress) for m in BASELINES]
        scorer.score(these)
        if final:
            scorer.test(these)
        runs += these
        done.append(s)
        result = {"campaign": base.name, "seeds": list(done), "reeval_seeds": list(reeval_seeds),
                  "final_seed": FINAL_SEED if final else None, "runs": runs,
                  "budgets": budgets(runs), "summary": summary(runs),
                  "differences": differences(runs), "anytime": anytime(runs)}
        if on_seed:
            on_seed(result)
    return result


# ---- the methods -------------------------------------------------------------------------------

def run_service(base, seed, data, storage, workers, progress, method="service"):
    """The campaign's phases (not the final run) with sampler seed `seed`: the run's record
    (its studies named <method>-s<seed>-<phase>)."""
    c = dataclasses.replace(base, name=f"{method}-s{seed}", seed=seed)
    studies = []
    for phase in c.phases:
        log.info("seed %d: %s phase %s", seed, method, phase.name)
        study, _ = core.run_phase(c, phase.name, data, storage, workers=workers,
                                  progress=progress)
        studies.append((phase, study))
    pick, source = core.campaign_best(core.run_context(c, data, storage))
    tagged = [(t, p.confirmable) for p, s in studies for t in ordered(s)]
    record_ = run_record(method, seed, [t for t, _ in tagged],
                         incumbents(tagged, final_pick=(pick, source["val_acc"])), pick,
                         source["val_acc"], [s.study_name for _, s in studies])
    record_["phase_updates"] = {p.name: budget.spent(ordered(s), "updates") for p, s in studies}
    return record_


def run_baseline(base, method, seed, amount, data, storage, workers, progress):
    """A plain study over the first phase's space, no pruner, `amount` updates: its record."""
    first = base.phases[0]
    phase = SearchPhase(name="search", n_trials=MAX_TRIALS, space=first.base_space(base),
                        sampler=BASELINES[method](seed=seed), pruner="none",
                        budget=Budget("updates", amount))
    c = validated(dataclasses.replace(base, name=f"{method}-s{seed}", seed=seed, phases=(phase,)))
    log.info("seed %d: %s with %s", seed, method, phase.budget)
    study, _ = core.run_phase(c, "search", data, storage, workers=workers, progress=progress)
    trials = ordered(study)
    best = max((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE),
               key=lambda t: t.value)
    return run_record(method, seed, trials, incumbents([(t, True) for t in trials]),
                      dict(best.params), best.value, [study.study_name])


def ordered(study):
    """The study's trials that trained, in the order they were started."""
    return sorted((t for t in study.get_trials(deepcopy=False)
                   if not record.is_bookkeeping(t)), key=lambda t: t.number)


def incumbents(tagged, final_pick=None):
    """[{updates, params, own_val}]: of (trial, searched) pairs, the best complete searched
    trial so far each time it changes, at the updates spent (by every trial) when it finished;
    final_pick ((params, own val): a confirm verdict) ends the list at the trials' total."""
    out, spent, best = [], 0.0, -math.inf
    for t, searched in tagged:
        spent += budget.cost(t, "updates")
        if searched and t.state == optuna.trial.TrialState.COMPLETE and t.value > best:
            best = t.value
            out.append({"updates": spent, "params": dict(t.params), "own_val": t.value})
    if final_pick is not None:
        out.append({"updates": spent, "params": dict(final_pick[0]), "own_val": final_pick[1]})
    return out


def run_record(method, seed, trials, path, pick, own_val, studies):
    spent = budget.spent(trials, "updates")
    states = [t.state.name for t in trials]
    return {"seed": seed, "method": method, "updates": spent, "trials": len(trials),
            "pruned": states.count("PRUNED"), "pick": dict(pick), "own_val": own_val,
            "incumbents": path, "studies": studies}


# ---- an early-stopping rule against the campaign's own ------------------------------------------

def compare_rule(data, *, campaign, rule, seeds=range(3), reeval_seeds=REEVAL_SEEDS, storage_dir,
                 workers=1, progress=None, on_seed=None):
    """The campaign's search phases with their own pruners ("own") against the same phases with
    every search phase's pruner replaced by `rule` (a pruner spec, e.g. "hyperband" or "none")
    and given, as its budget in updates, what "own" spent in that phase ("rule"): equal compute
    per phase, up to one trial more for the rule. Both picks are re-evaluated on fresh seeds
    (Scorer); returns {"runs", "differences": {"rule-own:reeval_val": paired(...)}, ...}."""
    base = load_campaign(campaign) if isinstance(campaign, str) else campaign
    searched = [p.name for p in base.phases if isinstance(p, SearchPhase)]
    Path(storage_dir).mkdir(parents=True, exist_ok=True)
    scorer = Scorer(base, data, reeval_seeds, workers, cache=Path(storage_dir) / "trained.json")
    runs = []
    for s in seeds:
        storage = open_storage(f"sqlite:///{Path(storage_dir) / f'seed{s}.db'}")
        own = run_service(base, s, data, storage, workers, progress, method="own")
        variant = settings.apply(base, {
            **{f"phases.{p}.pruner": rule for p in searched},
            **{f"phases.{p}.budget": f"{own['phase_updates'][p]:.0f} updates" for p in searched},
            **{f"phases.{p}.n_trials": MAX_TRIALS for p in searched}})
        ruled = run_service(variant, s, data, storage, workers, progress, method="rule")
        scorer.score([own, ruled])
        runs += [own, ruled]
        result = {"campaign": base.name, "rule": rule, "own_pruners": {
                      p: str(pruner_label(base.phase(p).pruner)) for p in searched},
                  "seeds": sorted({r["seed"] for r in runs}), "reeval_seeds": list(reeval_seeds),
                  "runs": runs, "differences": {"rule-own:reeval_val": paired(
                      [r["reeval_val"] for r in runs if r["method"] == "rule"],
                      [r["reeval_val"] for r in runs if r["method"] == "own"])}}
        if on_seed:
            on_seed(result)
    return result


# ---- re-evaluation and test ----------------------------------------------------------------------

class Scorer:
    """Trains configurations again on fresh seeds under the search protocol (each distinct one
    once, in `workers` forked processes sharing the data) and sets their mean val accuracy;
    trains each distinct pick once under the final protocol (seed FINAL_SEED) and tests it."""

    def __init__(self, base, data, seeds, workers, cache=None):
        self.base, self.config = base, pinned(base.phase_config(base.phases[0]))
        self.data, self.seeds, self.workers = data, tuple(seeds), workers
        self.vals, self.tests = {}, {}  # by (params key, seed) and by params key
        self.cache = cache  # a JSON file of both: a rerun trains nothing twice
        if cache is not None and Path(cache).exists():
            saved = json.loads(Path(cache).read_text())
            if saved.get("config") == self._fingerprint():
                self.vals = {(key(v["params"]), v["seed"]): v["acc"] for v in saved["vals"]}
                self.tests = {key(v["params"]): v["acc"] for v in saved["tests"]}

    def _fingerprint(self):
        return repr((self.config, self.base.final))

    def _save(self):
        if self.cache is not None:
            Path(self.cache).write_text(json.dumps({
                "config": self._fingerprint(),
                "vals": [{"params": dict(k), "seed": s, "acc": a}
                         for (k, s), a in self.vals.items()],
                "tests": [{"params": dict(k), "acc": a} for k, a in self.tests.items()]}))

    def score(self, runs):
        points = [p for r in runs for p in r["incumbents"]]
        picks = [{"params": r["pick"]} for r in runs]
        wanted = dict.fromkeys(key(p["params"]) for p in points + picks)
        jobs = [(k, s) for k in wanted for s in self.seeds if (k, s) not in self.vals]
        log.info("re-evaluating %d configurations on %d seeds (%d trainings)", len(wanted),
                 len(self.seeds), len(jobs))
        configs = [dataclasses.replace(self.config, **dict(k), seed=s) for k, s in jobs]
        self.vals.update(zip(jobs, parallel(_val_acc, self.data, configs, self.workers)))
        self._save()
        for p in points + picks:
            k = key(p["params"])
            p["reeval_vals"] = [self.vals[(k, s)] for s in self.seeds]
            p["reeval_val"] = float(np.mean(p["reeval_vals"]))
        for r, p in zip(runs, picks):
            r["reeval_vals"], r["reeval_val"] = p["reeval_vals"], p["reeval_val"]

    def test(self, runs):
        picks = [k for k in dict.fromkeys(key(r["pick"]) for r in runs) if k not in self.tests]
        n_train = len(self.data.train.y)
        configs = [dataclasses.replace(self.base.final.training_config(self.base, dict(k), n_train),
                                       seed=FINAL_SEED) for k in picks]
        log.info("final protocol: %d picks", len(picks))
        self.tests.update(zip(picks, parallel(_test_acc, self.data, configs, self.workers)))
        self._save()
        for r in runs:
            r["test_acc"] = self.tests[key(r["pick"])]


def key(params):
    return tuple(sorted(params.items()))


def _val_acc(data, config):
    _, history = fit(data, config, train_curve=False)
    return float(history[-1]["val"]["acc"])


def _test_acc(data, config):
    return float(train_seed(data, config, train_curve=False)["test"]["acc"])


_SHARED = {}  # what forked re-evaluation workers read: the parent's data, not a copy


def _init(data):
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: the pool's end kills
    _SHARED["data"] = data
    _SHARED["limits"] = threadpool_limits(limits=1, user_api="blas")  # kept for the worker's life


def _call(args):
    fn, config = args
    return fn(_SHARED["data"], config)


def parallel(fn, data, configs, workers):
    """[fn(data, config) for config in configs], in order, in `workers` forked processes."""
    if workers <= 1 or len(configs) <= 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return [fn(data, c) for c in configs]
    pool = multiprocessing.get_context("fork").Pool(workers, _init, (data,))
    try:
        out = pool.map(_call, [(fn, c) for c in configs], chunksize=1)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()  # workers end by themselves: terminate()'s SIGTERM could hang one in a lock
        pool.join()
    return out


# ---- figures -------------------------------------------------------------------------------------

def budgets(runs):
    """Per seed, each method's updates and the largest excess of a baseline over the service."""
    out = {}
    for s in sorted({r["seed"] for r in runs}):
        spent = {r["method"]: r["updates"] for r in runs if r["seed"] == s}
        out[str(s)] = {**spent, "max_excess": max(spent[m] - spent["service"] for m in BASELINES)}
    return out


def by_method(runs, field):
    """{method: [field of its run for each seed, in seed order]}."""
    seeds = sorted({r["seed"] for r in runs})
    return {m: [next(r[field] for r in runs if r["method"] == m and r["seed"] == s)
                for s in seeds] for m in METHODS}


def summary(runs):
    out = {}
    for field in ("reeval_val", "test_acc", "updates", "own_val"):
        if all(field in r for r in runs):
            for m, values in by_method(runs, field).items():
                out.setdefault(m, {})[f"{field}_mean"] = float(np.mean(values))
    return out


def differences(runs):
    """service − baseline, paired over campaign seeds, on the re-evaluated val accuracy and the
    test accuracy: mean, 95% CI (paired t) and p (two-sided); CI and p None below 2 seeds."""
    out = {}
    for field in ("reeval_val", "test_acc"):
        if not all(field in r for r in runs):
            continue
        values = by_method(runs, field)
        for m in BASELINES:
            out[f"service-{m}:{field}"] = paired(values["service"], values[m])
    return out


def paired(a, b):
    d = np.subtract(a, b)
    row = {"mean": float(np.mean(d)), "per_seed": [float(x) for x in d], "n": len(d),
           "ci95": None, "p": None}
    if len(d) >= 2 and np.std(d) > 0:
        t = ttest_rel(a, b)
        ci = t.confidence_interval(0.95)
        row.update(ci95=[float(ci.low), float(ci.high)], p=float(t.pvalue))
    return row


def anytime(runs, points=200):
    """Best re-evaluated val accuracy (of the incumbent: the method's best trial so far by its
    own val) against updates spent, on a common grid; per method, the mean over seeds (None
    where some seed has no incumbent yet)."""
    top = max(r["updates"] for r in runs)
    grid = np.linspace(0, top, points + 1)[1:]
    out = {"updates": [float(x) for x in grid]}
    for m in METHODS:
        curves = [incumbent_curve(r["incumbents"], grid) for r in runs if r["method"] == m]
        mean = np.mean(curves, axis=0)
        out[m] = [None if math.isnan(v) else float(v) for v in mean]
    return out


def incumbent_curve(path, grid):
    """The re-evaluated val accuracy of the incumbent at each grid point (nan before the first);
    after the method's last trial its last incumbent holds."""
    xs = np.array([p["updates"] for p in path])
    ys = np.array([p["reeval_val"] for p in path])
    idx = np.searchsorted(xs, grid, side="right") - 1
    return np.where(idx >= 0, ys[np.maximum(idx, 0)], np.nan)


def plot_anytime(result, path):
    """The anytime curves as a PNG (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["anytime"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"service": dict(lw=2.4, zorder=3), "tpe": dict(ls="--", lw=1.6, zorder=2),
              "random": dict(ls=":", lw=1.6, zorder=2)}  # the service on top: they share a start
    for m in METHODS:
        y = [np.nan if v is None else 100 * v for v in a[m]]
        ax.plot(a["updates"], y, label=m, drawstyle="steps-post", **styles[m])
    for r in result["runs"]:  # where each run ended
        if r["method"] == "service":
            ax.axvline(r["updates"], color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("training updates spent (pruned and confirm trainings included)")
    ax.set_ylabel("re-evaluated val accuracy of the incumbent (%)")
    n = len(result["seeds"])
    ax.set_title(f"{result['campaign']}: mean over {n} campaign seed{'s' * (n > 1)}, "
                 f"re-evaluated on {len(result['reeval_seeds'])} fresh seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("anytime figure -> %s", path)
    return path

"""Deciding with confidence: race the best configurations of a search over paired seeds, drop the
clear losers early, and say how sure the pick is.

Every configuration is trained with the same seeds (paired: a seed's luck is shared), in blocks
of seeds (the first `min_seeds`, then two at a time, each block trained at once). At the end of a
block, a configuration whose mean is below the leader's and whose paired one-sided t-test against
the leader gives p < alpha is dropped. When the seeds
are spent (or one configuration is left) the pick is the best mean among the survivors; it is
compared with the runner-up (the next survivor, else the last configuration dropped) by a paired
t interval on their common seeds. The interval covers seed noise on one fixed validation set,
not the sampling of that set: it says whether another seed would change the pick.

The tests (tests/test_confirm.py) run this code on synthetic objectives with known means and
paired seed noise, 200 simulations each: coverage of the true difference, the rate of a right
pick, and how often equal configurations are called distinguishable.
"""
import dataclasses
import math

import numpy as np
from optuna.trial import TrialState
from scipy import stats

from model.dataset import fingerprint
from model.errors import InputError, WorkersFailed
from search.campaign import source_space
from search.objective import Objective
from search.phases import create_or_resume, phase_spec, run_to
from search.runner import is_diverged, n_done
from search.space import format_params
from search.study import finished_trials, load_study, study_name

CONFIDENCE = 0.95
ALPHA_DROP = 0.01   # one-sided p below which a configuration is dropped (tested at every round)
MIN_SEEDS = 3       # rounds before anything is dropped
BLOCK = 2           # seeds trained between two drop tests after the first min_seeds


@dataclasses.dataclass
class Race:
    """The state and the result of a race: scores[c] holds configuration c's value per round."""

    n_configs: int
    scores: dict = dataclasses.field(default_factory=dict)   # config -> [value per seed round]
    dropped: dict = dataclasses.field(default_factory=dict)  # config -> round it was dropped at
    order: list = dataclasses.field(default_factory=list)    # configs in the order dropped

    @property
    def survivors(self):
        return [c for c in range(self.n_configs) if c not in self.dropped]

    def mean(self, c):
        return float(np.mean(self.scores[c]))


def race(n_configs, seeds, evaluate_round, min_seeds=MIN_SEEDS, alpha=ALPHA_DROP, block=BLOCK,
         prefetch=None):
    """Run the race: evaluate_round(configs, seed) -> [value per config] for each seed in turn;
    returns the Race. Seeds come in blocks (the first min_seeds, then `block` at a time) and the
    losers are dropped at the end of a block: prefetch(configs, block_seeds), when given, is
    called before each block so that the caller can train all of it at once (its trials keep
    every worker busy; a round of 3 trials on 2 workers leaves one idle half the time)."""
    state = Race(n_configs, {c: [] for c in range(n_configs)})
    blocks = [seeds[:min_seeds]] + [seeds[i:i + block] for i in range(min_seeds, len(seeds), block)]
    r = 0
    for seeds_of_block in blocks:
        alive = state.survivors
        if prefetch:
            prefetch(alive, seeds_of_block)
        for seed in seeds_of_block:
            for c, value in zip(alive, evaluate_round(alive, seed)):
                state.scores[c].append(float(value))
        r += len(seeds_of_block)
        if r >= min_seeds:
            drop_losers(state, r, alpha)
        if len(state.survivors) == 1:
            break
    return state


def drop_losers(state, round_number, alpha=ALPHA_DROP):
    """Drop every survivor that the leader beats by a paired one-sided t-test with p < alpha."""
    alive = state.survivors
    leader = max(alive, key=state.mean)
    for c in alive:
        if c != leader and one_sided_p(state.scores[leader], state.scores[c]) < alpha:
            state.dropped[c] = round_number
            state.order.append(c)


def one_sided_p(a, b):
    """p of the paired t-test "a > b" on the common rounds (1.0 when it cannot be computed)."""
    d = _paired(a, b)
    if len(d) < 2:
        return 1.0
    sd = float(np.std(d, ddof=1))
    if sd == 0:
        return 0.0 if np.mean(d) > 0 else 1.0
    t = float(np.mean(d)) / (sd / math.sqrt(len(d)))
    return float(stats.t.sf(t, df=len(d) - 1))


def paired_interval(a, b, confidence=CONFIDENCE):
    """(mean of a − b, half-width of its t interval) over the common rounds."""
    d = _paired(a, b)
    if len(d) < 2:
        return float(np.mean(d)) if len(d) else 0.0, math.inf
    half = stats.t.ppf(0.5 + confidence / 2, df=len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
    return float(np.mean(d)), float(half)


def _paired(a, b):
    n = min(len(a), len(b))
    return np.asarray(a[:n], dtype=float) - np.asarray(b[:n], dtype=float)


def verdict(state, confidence=CONFIDENCE):
    """{"pick", "runner_up", "diff", "half_width", "distinguishable", "n_seeds"} of a Race.

    pick: the best mean among the survivors; runner_up: the next survivor, else the configuration
    dropped last (None when there was one configuration). distinguishable: the interval of
    pick − runner_up excludes 0.
    """
    alive = sorted(state.survivors, key=state.mean, reverse=True)
    pick = alive[0]
    runner_up = alive[1] if len(alive) > 1 else (state.order[-1] if state.order else None)
    if runner_up is None:
        return {"pick": pick, "runner_up": None, "diff": None, "half_width": None,
                "distinguishable": None, "n_seeds": len(state.scores[pick]),
                "confidence": confidence}
    diff, half = paired_interval(state.scores[pick], state.scores[runner_up], confidence)
    return {"pick": pick, "runner_up": runner_up, "diff": diff, "half_width": half,
            "distinguishable": bool(diff - half > 0),
            "n_seeds": min(len(state.scores[pick]), len(state.scores[runner_up])),
            "confidence": confidence}


def sentence(v, label):
    """The verdict in one sentence; label(config) names a configuration, e.g. "λ = 1.5e-03".
    Differences are in points of accuracy (values are fractions)."""
    if v["runner_up"] is None:
        return f"{label(v['pick'])} was the only configuration confirmed"
    pct = f"{100 * v['diff']:.1f} ± {100 * v['half_width']:.1f} points " \
          f"({100 * v['confidence']:.0f}% CI, {v['n_seeds']} paired seeds)"
    if v["distinguishable"]:
        return f"{label(v['pick'])} is better than {label(v['runner_up'])} by {pct}"
    return (f"{label(v['pick'])} and {label(v['runner_up'])} are not distinguishable (difference "
            f"{pct}): any of these is as good")


# ---- the confirm phase of a campaign -------------------------------------------------------------

_PENDING = (TrialState.WAITING, TrialState.RUNNING)
SEED_BASE = 1000  # confirm seeds are 1000, 1001, …: never the searches' training seeds (0 + repeats)


def candidates(storage, campaign_name, sources, top_k):
    """The best top_k distinct configurations among the complete trials of the studies of the
    phases `sources`: [{"params", "study", "trial", "val_acc"}], best first."""
    found = []
    for phase in sources:
        study = load_study(storage, study_name(campaign_name, phase))
        found += [(t, study.study_name) for t in finished_trials(study)]
    found.sort(key=lambda item: item[0].value, reverse=True)
    out = []
    for t, source in found:
        if all(c["params"] != t.params for c in out):
            out.append({"params": dict(t.params), "study": source, "trial": t.number,
                        "val_acc": t.value})
        if len(out) == top_k:
            break
    if len(out) < 2:
        raise InputError(f"the confirm phase compares {top_k} configurations but "
                         f"{', '.join(sources)} hold {len(out)} distinct complete trial(s): run "
                         "or resume the search phases first")
    return out


def run_confirm(campaign, name, storage, data, workers=1, storage_opts=None, progress=None):
    """Run (or resume) the confirm phase `name` of campaign: race its candidates (recorded in
    the study when it is created) over paired seeds; every (candidate, seed) is one trial, queued
    with its parameters and seed. Records the verdict in the study's user attrs and returns
    (study, verdict)."""
    phase = campaign.phase(name)
    rule = phase.confirm
    # every queued trial trains to its end (a pruned one would leave its pair without a value),
    # whatever pruner a flag set for every phase
    spec = dataclasses.replace(phase_spec(campaign, name, storage),
                               space=source_space(campaign, phase), sampler="random",
                               pruner="none", grid=None)
    study = create_or_resume(storage, spec, fingerprint(data))
    if "candidates" not in study.user_attrs:
        cands = candidates(storage, campaign.name, rule["from"], rule["top_k"])
        seeds = [SEED_BASE + r for r in range(rule["seeds"])]
        for key, value in {"kind": "confirm", "candidates": cands, "confirm_seeds": seeds}.items():
            study.set_user_attr(key, value)
    cands, seeds = study.user_attrs["candidates"], study.user_attrs["confirm_seeds"]
    objective = Objective(data, spec.config, spec.space, queued_only=True)

    def train(alive, block_seeds):
        """Queue and train every (candidate, seed) of the block that has no result yet."""
        have = round_values(study)
        missing = [(c, s) for s in block_seeds for c in alive if (c, s) not in have]
        if missing:
            queued = {(t.user_attrs.get("candidate"), t.user_attrs.get("confirm_seed"))
                      for t in study.get_trials(deepcopy=False, states=_PENDING)}
            for c, s in missing:
                if (c, s) not in queued:
                    study.enqueue_trial(cands[c]["params"], skip_if_exists=False,
                                        user_attrs={"candidate": c, "confirm_seed": s})
            target = n_done(study, count_diverged=True) + len(missing)
            run_to(study, spec, storage, objective, target, workers, storage_opts, progress,
                   count_diverged=True)

    def evaluate_round(alive, seed):
        train(alive, [seed])  # nothing to do when the block was trained (prefetch)
        have = round_values(study)
        lost = [c for c in alive if (c, seed) not in have]
        if lost:
            raise WorkersFailed(f"{spec.study_name}: seed {seed} of configuration(s) {lost} did "
                                "not finish; re-run the same command to resume")
        return [have[(c, seed)] for c in alive]

    state = race(len(cands), seeds, evaluate_round, prefetch=train)
    v = verdict(state)
    v.update(sentence=sentence(v, lambda c: format_params(cands[c]["params"])),
             params=cands[v["pick"]]["params"],
             scores={str(c): s for c, s in state.scores.items()},
             dropped={str(c): r for c, r in state.dropped.items()},
             means={str(c): state.mean(c) for c in state.scores if state.scores[c]})
    study.set_user_attr("verdict", v)
    return study, v


def round_values(study):
    """{(candidate, seed): validation accuracy} of the confirm study's finished trials (a diverged
    training counts as accuracy 0: a configuration that diverges loses)."""
    values = {}
    for t in study.get_trials(deepcopy=False):
        key = (t.user_attrs.get("candidate"), t.user_attrs.get("confirm_seed"))
        if key[0] is None:
            continue
        if t.state == TrialState.COMPLETE:
            values[key] = t.value
        elif is_diverged(t):
            values.setdefault(key, 0.0)
    return values

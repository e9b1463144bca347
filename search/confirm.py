"""Deciding with confidence and little compute: race the best configurations of a search over
paired seeds, drop the clear losers early, stop once the pick is decided, and say how sure it is.

The procedure (a race, as in F-race / irace with their paired t-test; docs/search-method.md has
the design, its justification and the simulation figures):
- every configuration is trained with the same seeds (paired: a seed's luck is shared), the
  first `min_seeds` (2) together, then one seed at a time for the configurations still in;
- after each seed, a configuration is dropped when the leader (the best mean) beats it by a
  paired one-sided t-test (scipy.stats.ttest_rel, alternative="greater") with p < alpha (0.1);
- the race stops when one configuration is left (the pick is decided) or at the seed cap;
- the pick is the best mean among the survivors; it is compared with the runner-up (the next
  survivor, else the configuration dropped last) by the 95% t interval of their paired
  differences (ttest_rel(...).confidence_interval()) on their common seeds.
Dropping at p < 0.1 buys the early stop: a loser is dropped at 2 or 3 seeds, where a 95% test
has almost no power. It risks little, as dropping the best needs a loser to lead it first; the
interval is the stricter statement, so a decided race may still say "not distinguishable at
95%". The interval covers seed noise on one fixed validation set, not the sampling of that set:
it says whether another seed would change the pick.

The tests (tests/test_confirm.py) run this code on synthetic objectives with known means and
paired seed noise, 200 simulations each: coverage of the true difference, the rate of a right
pick, how often equal configurations are called distinguishable, and the trainings used.
"""
import contextlib
import dataclasses
import math
import warnings

import numpy as np

CONFIDENCE = 0.95
ALPHA_DROP = 0.1    # one-sided p below which the leader drops a configuration (after every seed)
MIN_SEEDS = 2       # seeds trained by every configuration before the first drop test
BLOCK = 1           # seeds trained between two drop tests after the first min_seeds


@dataclasses.dataclass
class Race:
    """The state and the result of a race: scores[c] holds configuration c's value per round."""

    n_configs: int
    scores: dict = dataclasses.field(default_factory=dict)   # config -> [value per seed round]
    dropped: dict = dataclasses.field(default_factory=dict)  # config -> round it was dropped at
    order: list = dataclasses.field(default_factory=list)    # configs in the order dropped
    cap: int = 0                                             # the seeds it may use at most

    @property
    def survivors(self):
        return [c for c in range(self.n_configs) if c not in self.dropped]

    def mean(self, c):
        return float(np.mean(self.scores[c]))

    @property
    def trainings(self):
        return sum(len(v) for v in self.scores.values())


def race(n_configs, seeds, evaluate_round, min_seeds=MIN_SEEDS, alpha=ALPHA_DROP, block=BLOCK,
         prefetch=None):
    """Run the race: evaluate_round(configs, seed) -> [value per config] for each seed in turn;
    returns the Race. Seeds come in blocks (the first min_seeds, then `block` at a time) and the
    losers are dropped at the end of a block: prefetch(configs, block_seeds), when given, is
    called before each block so that the caller can train all of it at once (its trials keep
    every worker busy). `seeds` is the cap: the race stops earlier once one configuration is left."""
    state = Race(n_configs, {c: [] for c in range(n_configs)}, cap=len(seeds))
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
    """p of the paired t-test "a > b" on the common rounds (scipy.stats.ttest_rel); 1.0 when it
    cannot be computed (fewer than 2 rounds, or every difference 0)."""
    a, b = _common(a, b)
    if len(a) < 2:
        return 1.0
    with _quiet():
        p = float(ttest_rel(a, b, alternative="greater").pvalue)
    return 1.0 if math.isnan(p) else p


def paired_interval(a, b, confidence=CONFIDENCE):
    """(mean of a − b, half-width of its t interval) over the common rounds (the interval of
    scipy.stats.ttest_rel; half-width inf below 2 rounds, 0 when every difference is equal)."""
    a, b = _common(a, b)
    if len(a) < 2:
        return float(np.mean(a - b)) if len(a) else 0.0, math.inf
    diff = float(np.mean(a - b))
    with _quiet():
        ci = ttest_rel(a, b).confidence_interval(confidence)
    half = (ci.high - ci.low) / 2
    return diff, 0.0 if math.isnan(half) else float(half)


def ttest_rel(a, b, **kwargs):
    """scipy.stats.ttest_rel, imported on the first test: scipy.stats takes ~1 s to import,
    which every script's start (an error message, --help) paid before."""
    from scipy import stats

    return stats.ttest_rel(a, b, **kwargs)


def _common(a, b):
    n = min(len(a), len(b))
    return np.asarray(a[:n], dtype=float), np.asarray(b[:n], dtype=float)


@contextlib.contextmanager
def _quiet():
    """scipy warns when the differences are (nearly) all equal, as on tiny validation sets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def verdict(state, confidence=CONFIDENCE):
    """{"pick", "runner_up", "diff", "half_width", "distinguishable", "decided", "n_seeds",
    "trainings", "fixed_trainings", "confidence"} of a Race.

    pick: the best mean among the survivors; runner_up: the next survivor, else the configuration
    dropped last (None when there was one configuration). distinguishable: the interval of
    pick − runner_up excludes 0; decided: every other configuration was dropped before the cap.
    trainings: what the race trained; fixed_trainings: what training every configuration on
    every seed would have.
    """
    alive = sorted(state.survivors, key=state.mean, reverse=True)
    pick = alive[0]
    runner_up = alive[1] if len(alive) > 1 else (state.order[-1] if state.order else None)
    out = {"pick": pick, "runner_up": runner_up, "diff": None, "half_width": None,
           "distinguishable": None, "decided": len(alive) == 1 and state.n_configs > 1,
           "n_seeds": len(state.scores[pick]), "trainings": state.trainings,
           "fixed_trainings": state.n_configs * state.cap, "confidence": confidence}
    if runner_up is not None:
        diff, half = paired_interval(state.scores[pick], state.scores[runner_up], confidence)
        out.update(diff=diff, half_width=half, distinguishable=bool(diff - half > 0),
                   n_seeds=min(len(state.scores[pick]), len(state.scores[runner_up])))
    return out


def sentence(v, label):
    """The verdict in one sentence; label(config) names a configuration, e.g. "λ = 1.5e-03".
    Differences are in points of accuracy (values are fractions)."""
    used = _trainings(v)
    if v["runner_up"] is None:
        return f"{label(v['pick'])} was the only configuration confirmed{used}"
    pct = f"{100 * v['diff']:.1f} ± {100 * v['half_width']:.1f} points " \
          f"({100 * v['confidence']:.0f}% CI, {v['n_seeds']} paired seeds)"
    pick, other = label(v["pick"]), label(v["runner_up"])
    if v["distinguishable"]:
        return f"{pick} is better than {other} by {pct}{used}"
    if v.get("decided"):
        return (f"{pick} is the pick: the race dropped every other configuration as worse "
                f"(paired t-test, one-sided p < {ALPHA_DROP}); the last dropped, {other}, is "
                f"{pct} behind: more seeds would narrow it{used}")
    return (f"{pick} and {other} are not distinguishable (difference {pct}): any of these is "
            f"as good{used}")


def _trainings(v):
    """'; 7 of 15 trainings' (what the race used of the fixed design's), or '' for a verdict
    recorded before the race counted them."""
    if v.get("trainings") is None:
        return ""
    return f"; {v['trainings']} of {v['fixed_trainings']} trainings"


SEED_BASE = 1000  # confirm seeds are 1000, 1001, …: never the searches' training seeds (0 + repeats)

"""The confirm phase's statistics (search.confirm), on synthetic objectives with known means.

A configuration's value on seed s is its true mean + a seed effect shared by every configuration
(paired: sd 1 point) + its own noise (sd 0.4 point, so ~0.57 point of paired noise, as measured
on this network). 200 seeded simulations per claim, through the real racing code.
"""
import math
import re

import numpy as np
import pytest
from scipy import stats

from clr_lambda_search.search.confirm import one_sided_p, paired_interval, race, sentence, verdict

SEEDS = list(range(5))
N_SIM = 200


def simulate(means, rng_seed, shared=0.01, own=0.004):
    """[(Race, verdict)] of N_SIM races of configurations with these true means."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for _ in range(N_SIM):
        effect = {}

        def evaluate_round(configs, seed):
            effect.setdefault(seed, rng.normal(0, shared))
            return [means[c] + effect[seed] + rng.normal(0, own) for c in configs]
        state = race(len(means), SEEDS, evaluate_round)
        out.append((state, verdict(state)))
    return out


@pytest.mark.parametrize("means", [(0.52, 0.51, 0.51), (0.52, 0.515, 0.51), (0.513, 0.51, 0.51)])
def test_the_interval_covers_the_true_difference(means):
    runs = simulate(means, rng_seed=1)
    covered = [abs(v["diff"] - (means[v["pick"]] - means[v["runner_up"]])) <= v["half_width"]
               for _, v in runs]
    assert np.mean(covered) >= 0.90


def test_a_clearly_better_configuration_is_picked_and_the_race_decided():
    runs = simulate((0.51, 0.52, 0.51), rng_seed=2)  # the best is not the first: no order bias
    assert np.mean([v["pick"] == 1 for _, v in runs]) >= 0.95
    # the pick is decided before the cap: every other configuration dropped
    assert np.mean([v["decided"] for _, v in runs]) >= 0.9
    assert all(v["decided"] == (len(state.survivors) == 1) for state, v in runs)


def test_a_clear_pick_costs_at_most_60_percent_of_the_fixed_design():
    fixed = 3 * len(SEEDS)  # every configuration on every seed: 15 trainings
    clear = simulate((0.52, 0.51, 0.51), rng_seed=7)
    assert np.mean([state.trainings for state, _ in clear]) <= 0.6 * fixed
    assert all(v["trainings"] == state.trainings and v["fixed_trainings"] == fixed
               for state, v in clear)
    equal = simulate((0.51, 0.51, 0.51), rng_seed=8)
    assert max(state.trainings for state, _ in equal) <= fixed  # the seed cap


def test_equal_configurations_are_rarely_called_distinguishable_whatever_the_noise():
    # a t-test has no noise scale of its own: with twice the paired noise the claim still holds
    runs = simulate((0.51, 0.51, 0.51), rng_seed=9, shared=0.02, own=0.008)
    assert np.mean([v["distinguishable"] for _, v in runs]) <= 0.10


def test_a_slightly_better_configuration_is_picked_in_most_races():
    runs = simulate((0.510, 0.510, 0.513), rng_seed=3)
    assert np.mean([v["pick"] == 2 for _, v in runs]) > 0.6


def test_equal_configurations_are_rarely_called_distinguishable():
    runs = simulate((0.51, 0.51, 0.51), rng_seed=4)
    assert np.mean([v["distinguishable"] for _, v in runs]) <= 0.10


def test_clear_losers_are_dropped_early_and_train_no_more_seeds():
    runs = simulate((0.53, 0.50, 0.49), rng_seed=5)
    dropped = [state.dropped for state, _ in runs]
    assert np.mean([len(d) == 2 for d in dropped]) > 0.8
    for state, _ in runs:
        for c, at in state.dropped.items():
            assert len(state.scores[c]) == at  # no seed trained after the drop


def test_the_sentence_states_numbers_recomputed_from_the_seeds():
    scores = {0: [0.52, 0.515, 0.53, 0.525, 0.52], 1: [0.51, 0.512, 0.518, 0.509, 0.515]}
    state = race(2, SEEDS, lambda configs, seed: [scores[c][seed] for c in configs],
                 min_seeds=99)  # no drop: both survive five seeds
    v = verdict(state)
    d = np.subtract(scores[0], scores[1])
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert v["pick"] == 0 and v["runner_up"] == 1
    assert v["diff"] == pytest.approx(d.mean()) and v["half_width"] == pytest.approx(half)
    text = sentence(v, lambda c: f"config {c}")
    numbers = [float(x) for x in re.findall(r"(\d+\.\d) ± (\d+\.\d)", text)[0]]
    assert numbers == [round(100 * d.mean(), 1), round(100 * half, 1)]
    assert text.startswith("config 0 is better than config 1" if d.mean() - half > 0
                           else "config 0 and config 1 are not distinguishable")


def test_paired_statistics_agree_with_scipy():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.5, 0.01, 6), rng.normal(0.5, 0.01, 6)
    assert one_sided_p(a, b) == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue)
    mean, half = paired_interval(a, b)
    low, high = stats.t.interval(0.95, 5, loc=np.mean(a - b), scale=stats.sem(a - b))
    assert (mean - half, mean + half) == pytest.approx((low, high))


# ---- the confirm phase of a campaign, on tiny data ------------------------------------------------

def tiny_campaign(**confirm):
    from clr_lambda_search.search.campaign import parse_campaign

    tiny = {"m": 10, "n_batch": 10, "n_s": 5, "cycles": 1, "evals_per_cycle": 2,
            "eval_train_samples": 0, "dtype": "float64"}
    return parse_campaign({"name": "t", "search": tiny, "phases": [
        {"name": "coarse", "n_trials": 5, "pruner": "none",
         "params": {"lam": {"low": 1e-4, "high": 1.0, "log": True}}},
        {"name": "confirm", "kind": "confirm", **confirm}]})


def test_the_confirm_phase_races_the_best_configurations_and_resumes(tmp_path, tiny_data):
    from clr_lambda_search.search import record
    from clr_lambda_search.search.confirm import SEED_BASE
    from clr_lambda_search.search.core import campaign_best, run_context, run_phase
    from clr_lambda_search.search.study import finished_trials, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    c = tiny_campaign(top_k=3, seeds=4)
    coarse, _ = run_phase(c, "coarse", tiny_data, storage)
    best3 = [t.params for t in finished_trials(coarse)[:3]]
    study, _ = run_phase(c, "confirm", tiny_data, storage)
    v = record.read(study).verdict
    cands = record.read(study).candidates
    assert [x["params"] for x in cands] == best3  # the top 3 of coarse, best first
    trials = study.get_trials()
    # every trial is one (candidate, seed) with the candidate's parameters, each pair once
    pairs = [(t.user_attrs["candidate"], t.user_attrs["confirm_seed"]) for t in trials]
    assert len(pairs) == len(set(pairs)) <= 3 * 4
    for t in trials:
        assert t.params == cands[t.user_attrs["candidate"]]["params"]
        assert t.user_attrs["seeds"] == [t.user_attrs["confirm_seed"]]
        assert SEED_BASE <= t.user_attrs["confirm_seed"] < SEED_BASE + 4  # not the search's seed
    # the verdict's numbers are the trials' values
    for c_index, scores in v["scores"].items():
        mine = sorted((t.user_attrs["confirm_seed"], t.value) for t in trials
                      if t.user_attrs["candidate"] == int(c_index))
        assert [value for _, value in mine] == scores
    assert v["params"] == cands[v["pick"]]["params"]
    # the final run trains the pick
    assert campaign_best(run_context(c, tiny_data, storage))[0] == v["params"]
    # resumed: nothing is trained again, the verdict is the same
    again = c.phase("confirm").run(run_context(c, tiny_data, storage))
    assert len(again.get_trials()) == len(trials) and record.read(again).verdict == v


def test_confirm_phases_in_campaign_files_are_checked():
    from clr_lambda_search.model.errors import ConfigError
    from clr_lambda_search.search.campaign import parse_campaign

    base = {"name": "x", "phases": [{"name": "coarse", "params": {"lam": {"low": 1e-4,
                                                                           "high": 1.0}}}]}
    for bad, key in (({"top_k": 1}, "top_k"), ({"seeds": 1}, "seeds"), ({"from": "nope"}, "from"),
                     ({"params": {}}, "params")):
        with pytest.raises(ConfigError, match=key):
            parse_campaign({**base, "phases": base["phases"] + [
                {"name": "confirm", "kind": "confirm", **bad}]})
    with pytest.raises(ConfigError, match="from"):  # nothing to confirm before it
        parse_campaign({"name": "x", "phases": [{"name": "confirm", "kind": "confirm"}]})

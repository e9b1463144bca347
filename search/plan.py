"""What a campaign will train before it runs (the commands' --dry-run): each part's resolved spec
and an estimate of its updates and of its time on this machine.

    plan(campaign, ["coarse", "fine", "confirm", "final"], n_train=49_000, n_val=1_000)

Updates: a search phase trains n_trials × repeats × cycles × 2·n_s, a confirm phase top_k ×
seeds trainings of the search protocol, the final run seeds × its cycles × 2·n_s. A searched
parameter counts at a typical value (the middle of its range, geometrically for a log range; the
mean of numeric choices), and so does a narrowed range (derived at run time, inside its
source's). Pruned and failed trials come on top of n_trials, and stop early: not counted. A
phase with a budget (search.budget) counts up to it when its trials would spend more. Time: the
updates × a step time measured here on synthetic data of CIFAR-10's width for each part's m,
batch and regularisers (one BLAS thread, as a worker runs; the best of a few short blocks), plus
the evaluations (images evaluated × a measured per-image time).
"""
import dataclasses
import math
import time

import numpy as np

from clr_lambda_search.model.batch_files import D, K
from clr_lambda_search.model.dataset import split_and_normalise
from clr_lambda_search.model.network import init_params
from clr_lambda_search.model.step import StepParams, make_workspace
from clr_lambda_search.model.train import TrainConfig, evaluate, updates
from clr_lambda_search.search.phases import pinned
from clr_lambda_search.search.space import Categorical, is_typed, space_to_dict

TIMED_STEPS = 8       # updates per timed block, per network shape (after 3 untimed ones)
TIMED_BLOCKS = 3      # the best block counts: other processes on the machine shift it least
EVAL_IMAGES = 1000    # images of the timed evaluation


def typical(space):
    """{name: a typical value} of a space (search.space parameters), for the estimate."""
    out = {}
    for p in space if is_typed(space) else ():
        if isinstance(p, Categorical):
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool)
                          for c in p.choices)
            value = sum(p.choices) / len(p.choices) if numeric else p.choices[0]
        elif p.log:
            value = math.sqrt(p.low * p.high)
        else:
            value = (p.low + p.high) / 2
        if isinstance(getattr(TrainConfig(), p.name, None), int) and not isinstance(value, str):
            value = int(round(value))
        out[p.name] = value
    return out


def plan(campaign, parts, n_train, n_val, pick=None, workers=1, cpus=1, timer=None):
    """{"phases": [...], "final": {...} or None, "updates", "seconds", "wall_seconds"} of the
    parts (phase names and "final") of campaign. pick: the final run's parameters when known.
    timer: config -> (seconds per update, seconds per evaluated image); default measure()."""
    timer = timer or Timer()
    rows = [_phase_row(campaign, phase, n_train, n_val, timer) for phase in campaign.phases
            if phase.name in parts]
    final = _final_row(campaign, pick, n_train, n_val, timer) if "final" in parts else None
    done = rows + ([final] if final else [])
    seconds = sum(r["seconds"] for r in done)
    wall = sum(r["seconds"] / max(1, min(workers, cpus, r["trainings"])) for r in done)
    return {"phases": rows, "final": final, "updates": sum(r["updates"] for r in done),
            "seconds": seconds, "wall_seconds": wall, "workers": workers, "cpus": cpus}


def _phase_row(campaign, phase, n_train, n_val, timer):
    space = phase.base_space(campaign)
    config = dataclasses.replace(campaign.phase_config(phase), **typical(space))
    spec = phase.to_dict()
    if getattr(phase, "narrow", None):
        spec["space"] = None  # derived at run time, inside the source's
    row = {**spec, "study": phase.study_name(campaign.name),
           "base_space": space_to_dict(space), "config": dataclasses.asdict(
               campaign.phase_config(phase)), "trainings": phase.trials * phase.repeats}
    return {**row, **_capped(_cost(config, row["trainings"], n_train, n_val, timer),
                             getattr(phase, "budget", None))}


def _capped(cost, budget):
    """cost, cut at the phase's budget (search.budget: updates or training seconds) when it
    ends the phase before its n_trials."""
    if budget is None:
        return cost
    share = min(1.0, budget.amount / max(cost[budget.unit], 1e-12))
    return {**cost, "updates_without_budget": cost["updates"],
            **{k: type(cost[k])(cost[k] * share) for k in ("updates", "evaluated_images",
                                                           "seconds")}}


def _final_row(campaign, pick, n_train, n_val, timer):
    final = campaign.final
    values = pick if pick is not None else typical(_searched_space(campaign))
    config = final.training_config(campaign, values, n_train)
    known = dataclasses.asdict(final.training_config(campaign, pick or {}, n_train))
    fixed = {**dict(campaign.config), **dict(final.config), **(pick or {})}
    for p in _searched_space(campaign):  # from the campaign's best, at run time
        if p.name not in fixed:
            known[p.name] = None
    if known["n_batch"] is None and isinstance(final.n_s, str):
        known["n_s"] = None  # the rule's epochs are counted in batches of the pick's n_batch
    row = {**final.to_dict(), "study": f"{campaign.name}-final", "pick": pick,
           "config": known, "trainings": final.seeds}
    return {**row, **_cost(config, final.seeds, n_train, n_val, timer)}


def _searched_space(campaign):
    seen, out = set(), []
    for phase in campaign.phases:
        for p in phase.base_space(campaign) if is_typed(phase.base_space(campaign)) else ():
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
    return tuple(out)


def _cost(config, trainings, n_train, n_val, timer):
    """The updates, images evaluated and estimated seconds of `trainings` runs of config."""
    step_s, image_s = timer(config)
    per = config.total_steps
    images = len(config.eval_steps()) * ((config.eval_train_samples or n_train) + n_val)
    seconds = trainings * (per * step_s + images * image_s)
    return {"updates_per_training": per, "updates": trainings * per,
            "evaluated_images": trainings * images, "step_ms": step_s * 1e3,
            "seconds": seconds, "estimated_with": {k: getattr(config, k) for k in
                                                   ("m", "n_batch", "n_s", "cycles")}}


class Timer:
    """config -> (seconds per update, seconds per evaluated image), measured once per network
    shape (m, n_batch, dtype, regularisers, precision) on this machine."""

    def __init__(self, steps=TIMED_STEPS):
        self.steps, self.seen = steps, {}

    def __call__(self, config):
        config = pinned(config)
        key = (config.m, config.n_batch, config.dtype, config.dropout > 0, config.flip,
               config.shift, config.precision)
        if key not in self.seen:
            self.seen[key] = measure(config, self.steps)
        return self.seen[key]


def measure(config, steps=TIMED_STEPS):
    """(seconds per update, seconds per evaluated image) of config's network: `steps` updates of
    model.train's own loop (after 3 untimed ones) on synthetic pixels, then one evaluation."""
    rng = np.random.default_rng(0)
    n = max(3 * config.n_batch, EVAL_IMAGES)
    X_all, y_all = rng.integers(0, 256, (n + 10, D), dtype=np.uint8), rng.integers(0, K, n + 10)
    data = split_and_normalise(X_all, y_all, X_all[:10], y_all[:10], 10, config.dtype,
                               "synthetic")
    params = StepParams(init_params(D, config.m, K, rng, dtype=np.dtype(config.dtype)))
    ws = make_workspace(config.n_batch, D, config.m, K, np.dtype(config.dtype), config.dropout,
                        config.flip, config.shift, config.precision)
    loop = updates(params, data, dataclasses.replace(config, cycles=10**6), rng, ws)
    for _ in range(3):
        next(loop)
    blocks = []
    for _ in range(TIMED_BLOCKS):
        start = time.perf_counter()
        for _ in range(steps):
            next(loop)
        blocks.append((time.perf_counter() - start) / steps)
    step_s = min(blocks)
    start = time.perf_counter()
    evaluate(params, data.train.X[:EVAL_IMAGES], data.train.y[:EVAL_IMAGES], config.lam)
    return step_s, (time.perf_counter() - start) / EVAL_IMAGES

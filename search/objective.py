"""The Optuna objective: train with the suggested hyperparameters, return validation accuracy."""
import dataclasses
import logging
import time

import numpy as np
import optuna

from clr_lambda_search.model.errors import DivergedError
from clr_lambda_search.model.train import fit
from clr_lambda_search.search import record
from clr_lambda_search.search.space import format_params, suggest

log = logging.getLogger(__name__)


class Objective:
    """Callable(trial) -> mean validation accuracy over the repeat seeds.

    Built once per worker with the preloaded, normalised data, the phase's base TrainConfig and
    its space (search.space parameters, or a define-by-run callable trial -> {field: value}).
    Every trial is trained with the same seeds (base_config.seed, +1, …): comparisons are paired.
    The first seed reports validation accuracy at every evaluation point (the end of every half
    cycle when evals_per_cycle = 2) and is pruned when the pruner says so, but never at its last
    report: a trial that has trained to its end is judged by its final value (whatever the
    pruner, Hyperband's and successive halving's top rung included).
    """

    def __init__(self, data, base_config, space, repeats=1):
        self.data = data
        self.base_config = base_config
        self.space = space
        self.seeds = [base_config.seed + r for r in range(repeats)]

    def __call__(self, trial):
        # a confirm trial carries its paired seed
        seeds = [trial.user_attrs.get(record.CONFIRM_SEED)] if record.CONFIRM_SEED in \
            trial.user_attrs else self.seeds
        config = dataclasses.replace(self.base_config, **suggest(trial, self.space))
        trial.set_user_attr("seeds", seeds)
        spend = _Spend(trial)
        try:
            finals = [self._train_one(trial, dataclasses.replace(config, seed=seed), spend,
                                      first=(i == 0)) for i, seed in enumerate(seeds)]
        except BaseException:  # pruned or failed: charged what it trained (search.budget)
            spend.record()
            raise
        spend.record()
        attrs = summarise(finals)
        attrs.update(steps=config.total_steps, seconds=spend.seconds())
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        log.info("trial %d: %s val acc %.4f%s in %.1f s", trial.number,
                 format_params(trial.params), attrs["val_acc"],
                 f" ± {attrs['val_acc_std']:.4f}" if len(seeds) > 1 else "", attrs["seconds"])
        return attrs["val_acc"]

    def _train_one(self, trial, config, spend, first):
        try:
            with record.failure_said(trial):
                _, history = fit(self.data, config,
                                 on_eval=_reporter(trial, spend, first, config.total_steps))
        except DivergedError as e:
            log.warning("trial %d: %s", trial.number, e)
            raise
        spend.seed_done(config.total_steps)
        return history[-1]


class _Spend:
    """What a trial has trained: the updates of its finished seeds, plus the running seed's last
    evaluation point; recorded as the trial's `updates` and `seconds` (search.budget)."""

    def __init__(self, trial):
        self.trial, self.start = trial, time.perf_counter()
        self.finished = self.running = 0

    def seed_done(self, steps):
        self.finished, self.running = self.finished + steps, 0

    def seconds(self):
        return round(time.perf_counter() - self.start, 3)

    def record(self):
        self.trial.set_user_attr("updates", self.finished + self.running)
        self.trial.set_user_attr("seconds", self.seconds())


def _reporter(trial, spend, first, last_step):
    """on_eval callback: count the updates trained; on the first seed, report val accuracy at
    each evaluation point after 0, and prune if asked before last_step (the pruner is not asked
    at or after it: the training is done)."""
    def on_eval(record):
        step = record["step"]
        spend.running = step
        if step == 0 or not first:
            return
        trial.report(record["val"]["acc"], step)
        if step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")
    return on_eval


def summarise(finals):
    """User attrs from the last history record of each seed: means, std and per-seed values."""
    val_accs = [r["val"]["acc"] for r in finals]
    return {
        "val_acc": float(np.mean(val_accs)),
        "val_acc_std": float(np.std(val_accs)),
        "val_accs": val_accs,
        "val_loss": float(np.mean([r["val"]["loss"] for r in finals])),
        "val_cost": float(np.mean([r["val"]["cost"] for r in finals])),
        "train_acc": float(np.mean([r["train"]["acc"] for r in finals])),
    }

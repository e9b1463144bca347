"""A search phase's budget in compute: training updates, or training seconds.

    budget = "1e6 updates"      budget = "20 min"      budget = "90 s"      budget = "2 h"

What a trial costs is what it trained, recorded by the objective in the trial's user attrs
(`updates`, `seconds`) whether it completed, was pruned or failed: a pruned trial is charged the
updates it ran, so an aggressive pruner buys more trials, not more compute. The seconds are the
training time measured in the worker, summed over every trial in the storage: across resumes and
runners, without the time a run spent waiting or loading data. A trial whose worker died records
nothing and costs nothing (its retry trains it again and is charged).
"""
import dataclasses
import math
import re

from optuna.trial import TrialState

from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.search import record

UNITS = {"updates": ("updates", 1), "update": ("updates", 1), "steps": ("updates", 1),
         "s": ("seconds", 1), "sec": ("seconds", 1), "seconds": ("seconds", 1),
         "min": ("seconds", 60), "minutes": ("seconds", 60), "h": ("seconds", 3600),
         "hours": ("seconds", 3600)}
MAX_UPDATES, MAX_SECONDS = 10 ** 12, 366 * 24 * 3600  # a year: more is a typo
COST_KEYS = {"updates": "updates", "seconds": "seconds"}  # trial user attrs


@dataclasses.dataclass(frozen=True)
class Budget:
    unit: str       # "updates" or "seconds"
    amount: float

    def __str__(self):
        if self.unit == "updates":
            return f"{self.amount:g} updates"
        return f"{self.amount / 60:g} min" if self.amount >= 60 else f"{self.amount:g} s"


def parse_budget(text):
    """Budget of "<number> <unit>" (units: updates, s, min, h); ConfigError naming the form."""
    form = 'write e.g. "1e6 updates", "20 min", "90 s" or "2 h"'
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]+)\s*", text) if isinstance(text, str) \
        else None
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"budget {text!r}: {form}")
    try:
        number = float(match.group(1))
    except ValueError:
        raise ConfigError(f"budget {text!r}: {form}") from None
    unit, scale = UNITS[match.group(2).lower()]
    amount = number * scale
    cap = MAX_UPDATES if unit == "updates" else MAX_SECONDS
    if not (math.isfinite(amount) and 0 < amount <= cap):
        raise ConfigError(f"budget {text!r}: must be positive and at most {cap:g} {unit}")
    return Budget(unit, amount)


def cost(trial, unit):
    """What trial t trained, in unit (0 for a trial that never trained or whose worker died)."""
    if record.is_bookkeeping(trial) or trial.state not in (
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        return 0.0
    value = trial.user_attrs.get(COST_KEYS[unit])
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) \
        and value > 0 else 0.0


def spent(trials, unit):
    return sum(cost(t, unit) for t in trials)


def expected_cost(trials, unit, full_updates):
    """What a trial about to start is expected to cost: its full training in updates; in
    seconds, the mean of the complete trials so far (0 before the first one)."""
    if unit == "updates":
        return float(full_updates)
    done = [cost(t, unit) for t in trials if t.state == TrialState.COMPLETE]
    return sum(done) / len(done) if done else 0.0

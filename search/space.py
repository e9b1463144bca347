"""The search space, in one place, and the rule that narrows the coarse range for the fine phase.

Today the space holds λ alone; a new hyperparameter is one more Param whose name is a TrainConfig
field: the objective applies whatever the space suggests.
"""
import dataclasses
import math

from model.errors import ConfigError

COARSE_LAM = (1e-5, 1e-1)   # the report's λ = 10^U(−5, −1)
FINE_TOP_K = 3              # the fine range spans the best 3 coarse trials ...
FINE_MARGIN_DECADES = 0.25  # ... widened by a quarter decade (×1.78) on each side


@dataclasses.dataclass(frozen=True)
class Param:
    name: str       # a TrainConfig field
    low: float
    high: float
    log: bool = True

    def __post_init__(self):
        if self.log and self.low <= 0:
            raise ConfigError(f"{self.name}: the lower bound {self.low:g} must be > 0 on a log scale "
                              f"(e.g. --low 1e-5)")
        if not self.low < self.high:
            raise ConfigError(f"{self.name}: the lower bound {self.low:g} must be below the upper "
                              f"bound {self.high:g}")


def lam_space(low=COARSE_LAM[0], high=COARSE_LAM[1]):
    """The λ search space: log-uniform on [low, high]."""
    return (Param("lam", low, high, log=True),)


def suggest(trial, space):
    """{name: value} suggested by the trial for every Param of the space."""
    return {p.name: trial.suggest_float(p.name, p.low, p.high, log=p.log) for p in space}


def space_to_dict(space):
    return [dataclasses.asdict(p) for p in space]


def space_from_dict(items):
    return tuple(Param(**p) for p in items)


def fine_range(lams, bounds=COARSE_LAM, margin=FINE_MARGIN_DECADES):
    """The fine λ range from the λ of the best coarse trials.

    Rule: in log10 space, from the smallest to the largest of `lams`, widened by `margin` decades
    on each side, clipped to `bounds`.
    """
    logs = [math.log10(v) for v in lams]
    low = max(min(logs) - margin, math.log10(bounds[0]))
    high = min(max(logs) + margin, math.log10(bounds[1]))
    return 10 ** low, 10 ** high


def on_border(value, low, high, frac=0.05):
    """True when value lies within frac of the log span of a border of [low, high]."""
    span = math.log10(high) - math.log10(low)
    pos = (math.log10(value) - math.log10(low)) / span
    return pos < frac or pos > 1 - frac


def parse_values(text):
    """'0.001,0.002' -> [0.001, 0.002], sorted and unique; ConfigError on anything else."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--values {text!r} is not a comma-separated list of numbers "
                          "(e.g. --values 0.001,0.002,0.005)") from None
    if not values or values[0] <= 0 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--values {text!r} must list λ values > 0 (e.g. --values 0.001,0.002)")
    return values

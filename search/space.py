"""The search space: typed parameters named after TrainConfig fields, and the narrowing rule.

A Space is a tuple of parameters: Float (uniform or log), Int (uniform or log, with a step) and
Categorical. Each names a TrainConfig field and is checked against that field's type when it is
made, so a trial always builds a valid TrainConfig. Python users may instead pass a define-by-run
callable space(trial) -> {field: value}; such a space cannot be narrowed by a later phase, nor
checked for a change when its study is resumed (nothing describes it but its code).
"""
import dataclasses
import itertools
import math
import numbers
import typing

from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.train import TrainConfig

# Fields a search may not set: the training seed is the repeats' business, the dtype is no
# hyperparameter (it changes the precision, not the model).
NOT_SEARCHABLE = ("seed", "dtype")
_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def searchable():
    """The TrainConfig fields a space may name."""
    return [f for f in _FIELD_TYPES if f not in NOT_SEARCHABLE]


def field_type(name):
    """The type of TrainConfig field `name`; ConfigError for a field a space may not name."""
    if name not in _FIELD_TYPES or name in NOT_SEARCHABLE:
        raise ConfigError(f"unknown parameter {name!r}: a space names TrainConfig fields "
                          f"({', '.join(searchable())})")
    return _FIELD_TYPES[name]


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_bounds(p):
    if not (_is_number(p.low) and _is_number(p.high)):
        raise ConfigError(f"{p.name}: the bounds must be numbers (got {p.low!r}, {p.high!r})")
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        raise ConfigError(f"{p.name}: the bounds must be finite (got {p.low:g}, {p.high:g})")
    if p.log and p.low <= 0:
        raise ConfigError(f"{p.name}: the lower bound {p.low:g} must be > 0 on a log scale "
                          f"(e.g. low = 1e-5)")
    if not p.low < p.high:
        raise ConfigError(f"{p.name}: the lower bound {p.low:g} must be below the upper "
                          f"bound {p.high:g}")


@dataclasses.dataclass(frozen=True)
class Float:
    """A float TrainConfig field drawn from [low, high], uniformly or log-uniformly."""

    name: str
    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if field_type(self.name) is not float:
            raise ConfigError(f"{self.name} is an {field_type(self.name).__name__} field: use an "
                              f"int range (integer bounds) or a list of choices, not a float range")
        _check_bounds(self)

    def suggest(self, trial):
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value):
        return _is_number(value) and self.low <= value <= self.high


@dataclasses.dataclass(frozen=True)
class Int:
    """An int TrainConfig field drawn from low, low + step, … ≤ high (log: step must be 1)."""

    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self):
        if field_type(self.name) is not int:
            raise ConfigError(f"{self.name} is a {field_type(self.name).__name__} field: give it a "
                              "float range, not an int range")
        if not (_is_int(self.low) and _is_int(self.high) and _is_int(self.step)):
            raise ConfigError(f"{self.name} is an int field: its bounds and step must be integers "
                              f"(got low = {self.low!r}, high = {self.high!r}, step = {self.step!r})")
        _check_bounds(self)
        if self.step < 1 or (self.log and self.step != 1):
            raise ConfigError(f"{self.name}: the step must be ≥ 1, and 1 on a log scale "
                              f"(got {self.step})")

    def suggest(self, trial):
        return trial.suggest_int(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value):
        return _is_int(value) and self.low <= value <= self.high \
            and (value - self.low) % self.step == 0


@dataclasses.dataclass(frozen=True)
class Categorical:
    """A TrainConfig field drawn from a list of choices (for a grid: the values tried)."""

    name: str
    choices: tuple

    def __post_init__(self):
        kind = field_type(self.name)
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.choices or len(set(self.choices)) != len(self.choices):
            raise ConfigError(f"{self.name}: the choices must be a non-empty list without repeats "
                              f"(got {list(self.choices)})")
        ok = {int: _is_int, float: _is_number, bool: lambda x: isinstance(x, bool)}.get(
            kind, lambda x: isinstance(x, kind))
        bad = [c for c in self.choices if not ok(c)]
        if bad:
            raise ConfigError(f"{self.name} is a {kind.__name__} field: the choice(s) {bad} do "
                              f"not fit it")
        if kind is float:  # a float field listed as [1, 0.5] gets floats, as TrainConfig expects
            object.__setattr__(self, "choices", tuple(float(c) for c in self.choices))

    def suggest(self, trial):
        return trial.suggest_categorical(self.name, self.choices)

    def contains(self, value):
        return any(value == c and isinstance(value, bool) == isinstance(c, bool)
                   for c in self.choices)


KINDS = {"float": Float, "int": Int, "categorical": Categorical}
NUMERIC = (Float, Int)


def make_space(*params):
    """A space (tuple of parameters), refusing one parameter named twice."""
    names = [p.name for p in params]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"parameter {dup[0]} is given twice; give each parameter once")
    return tuple(params)


def is_typed(space):
    """True for a tuple of parameters, False for a define-by-run callable."""
    return not callable(space)


def suggest(trial, space):
    """{name: value} suggested by the trial for every parameter of the space (or by the callable,
    whose keys are checked against TrainConfig's fields)."""
    if is_typed(space):
        return {p.name: p.suggest(trial) for p in space}
    values = dict(space(trial))
    for name in values:
        field_type(name)
    return values


MAX_CORNERS = 256  # combinations of bounds checked together; past it, each parameter alone


def extremes(p):
    """The values of parameter p that bound every draw: its ends (an int range's reachable top)
    or every choice."""
    if isinstance(p, Categorical):
        return list(p.choices)
    if isinstance(p, Int):
        return [p.low, p.low + p.step * ((p.high - p.low) // p.step)]
    return [p.low, p.high]


def corners(space):
    """{name: value} at every corner of a typed space (all combinations of extremes, or each
    parameter's alone when there are more than MAX_CORNERS): TrainConfig's checks are ranges
    and pairs (η_min ≤ η_max), so a draw is valid when every corner is."""
    params = list(space) if is_typed(space) else []
    if math.prod(len(extremes(p)) for p in params) <= MAX_CORNERS:
        return [dict(zip([p.name for p in params], values))
                for values in itertools.product(*(extremes(p) for p in params))]
    return [{p.name: v} for p in params for v in extremes(p)]


def param_to_dict(p):
    """A parameter as a JSON-able dict. A float keeps the layout of the releases that searched λ
    alone ({name, low, high, log}) so that their studies compare equal on resume."""
    d = dataclasses.asdict(p)
    if not isinstance(p, Float):
        d["type"] = next(k for k, cls in KINDS.items() if isinstance(p, cls))
    if isinstance(p, Categorical):
        d["choices"] = list(p.choices)
    return d


def space_to_dict(space):
    """The space as a list of dicts, or None for a define-by-run callable."""
    return [param_to_dict(p) for p in space] if is_typed(space) else None


def space_from_dict(items):
    """The inverse of space_to_dict (a dict without "type" is a float)."""
    params = []
    for d in items:
        d = dict(d)
        params.append(KINDS[d.pop("type", "float")](**d))
    return make_space(*params)


def narrow(param, values, margin):
    """param's range around values (those of the best trials of an earlier phase).

    Rule: from the smallest to the largest value, widened by `margin` on each side — decades for
    a log parameter, fractions of param's span for a linear one — and clipped to param's bounds.
    An int range is rounded outward to its step and kept at least one step wide; a categorical
    parameter keeps its choices.
    """
    if isinstance(param, Categorical):
        return param
    if param.log:  # a clipped end is the bound itself (10 ** log10(0.2) is 0.20000000000000004)
        logs = [math.log10(v) for v in values]
        low = max(param.low, 10 ** (min(logs) - margin))
        high = min(param.high, 10 ** (max(logs) + margin))
    else:
        pad = margin * (param.high - param.low)
        low, high = max(min(values) - pad, param.low), min(max(values) + pad, param.high)
    if isinstance(param, Float):
        return dataclasses.replace(param, low=low, high=high)
    return _int_range(param, low, high)


def _int_range(param, low, high):
    step = param.step
    lo = param.low + step * math.floor((low - param.low) / step + 1e-9)
    hi = param.low + step * math.ceil((high - param.low) / step - 1e-9)
    hi = min(hi, param.low + step * ((param.high - param.low) // step))
    if hi <= lo:  # one value left: widen by a step, inside the bounds
        hi = lo + step if lo + step <= param.high else hi
        lo = hi - step if hi <= lo else lo
    return dataclasses.replace(param, low=int(lo), high=int(hi))


def on_border(param, value, frac=0.05):
    """True when a numeric value lies within frac of the span (log span for log) of a border."""
    if isinstance(param, Categorical):
        return False
    f = math.log10 if param.log else float
    pos = (f(value) - f(param.low)) / (f(param.high) - f(param.low))
    return pos < frac or pos > 1 - frac


def format_value(value):
    """A parameter's value for tables and logs: 4 significant digits for a float."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_params(params):
    """'lam=0.000308 n_batch=100': a trial's parameters on one line."""
    return " ".join(f"{k}={format_value(v)}" for k, v in params.items())


def parse_values(text, flag="--values"):
    """'0.001,0.002' -> [0.001, 0.002], sorted and unique; ConfigError on anything else."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of numbers "
                          f"(e.g. {flag} 0.001,0.002,0.005)") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} {text!r} must list finite numbers (e.g. {flag} 0.001,0.002)")
    return values

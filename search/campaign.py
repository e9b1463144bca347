"""Campaigns: the phases of a search and its final run, read from a TOML file.

A campaign file names its phases in order; each has a sampler, a pruner, a number of trials, its
parameters (ranges or value lists) or a rule deriving them from an earlier phase (`narrow`), and
TrainConfig overrides. `[config]` holds TrainConfig values shared by every phase and the final
run, `[search]` those of every search phase (the search protocol), `[final]` the final run's (its
seeds, an n_s rule such as "2 epochs", and TrainConfig values that win over the best parameters).
The files in search/campaigns/ ship with the package; dd2424.toml is today's protocol. Every
mistake in a file is a ConfigError naming the file, the key and the fix.
"""
import dataclasses
import hashlib
import json
import re
import sys
from importlib import resources
from pathlib import Path

from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.train import SEED_LIMIT, TrainConfig
from clr_lambda_search.search.budget import parse_budget
from clr_lambda_search.search.final import FinalRun
from clr_lambda_search.search.phases import MAX_MARGIN, ConfirmPhase, SearchPhase  # noqa: F401
from clr_lambda_search.search.space import (Categorical, Float, Int, corners, field_type, format_params,
                                           is_typed, make_space)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT = "dd2424"
_CAMPAIGN_KEYS = ("name", "description", "seed", "config", "search", "phases", "final")
_PHASE_KEYS = ("name", "kind", "n_trials", "sampler", "pruner", "repeats", "params", "config",
               "narrow", "max_pruned", "max_failed", "budget", "start")
BUDGET_TRIALS = 1000  # a phase with a budget and no n_trials ends at its budget, or at these
_CONFIRM_KEYS = ("name", "kind", "from", "top_k", "seeds", "config")
CONFIRM_TOP_K, CONFIRM_SEEDS = 3, 5
_PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "values")
_NARROW_KEYS = ("from", "top_k", "margin")


@dataclasses.dataclass(frozen=True)
class Campaign:
    name: str
    phases: tuple               # search.phases types, in order
    final: FinalRun = FinalRun()
    seed: int = 0               # sampler seed of every phase's study
    config: tuple = ()          # TrainConfig values of every phase and of the final run
    search: tuple = ()          # TrainConfig values of every search phase
    source: str = "<python>"    # the file it was read from

    def phase(self, name):
        for p in self.phases:
            if p.name == name:
                return p
        raise ConfigError(f"campaign {self.name} has no phase {name!r} (phases: "
                          f"{', '.join(p.name for p in self.phases)})")

    def index(self, name):
        return [p.name for p in self.phases].index(name)

    def phase_config(self, phase):
        """The TrainConfig of a phase's trials, before its parameters are applied."""
        return TrainConfig(**{**dict(self.config), **dict(self.search), **dict(phase.config)})

    def phase_configs(self, phase):
        """The TrainConfigs at the corners of the phase's space (search.space.corners): every
        trial's lies between them. ConfigError for a corner TrainConfig refuses: a range that
        reaches past a field's limits is refused before any study exists."""
        base = {**dict(self.config), **dict(self.search), **dict(phase.config)}
        out = []
        for corner in corners(phase.base_space(self)):
            try:
                out.append(TrainConfig(**{**base, **corner}))
            except ConfigError as e:
                raise ConfigError(f"a trial could draw {format_params(corner)}: {e}; keep the "
                                  "range within the field's limits") from None
        return out

    def searched_names(self):
        """The names of the parameters the phases search, in order of appearance."""
        names = [p.name for phase in self.phases for p in phase.base_space(self)
                 if is_typed(phase.base_space(self))]
        return list(dict.fromkeys(names))

    def downstream(self, name):
        """The phases derived from phase `name`, directly or not, in order."""
        out = []
        for p in self.phases:
            if any(u == name or u in out for u in p.upstream()):
                out.append(p.name)
        return out

    def digest(self):
        """A short hash of the resolved campaign (what the studies record of it)."""
        text = json.dumps(to_dict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def to_dict(campaign):
    """The resolved campaign as plain data (spaces as dicts, samplers and pruners as labels)."""
    return {"name": campaign.name, "seed": campaign.seed, "config": dict(campaign.config),
            "search": dict(campaign.search), "phases": [p.to_dict() for p in campaign.phases],
            "final": campaign.final.to_dict()}


# ---- reading files ------------------------------------------------------------------------------

def shipped():
    """Names of the campaign files that ship with the package."""
    return sorted(p.name[:-5] for p in resources.files("clr_lambda_search.search").joinpath("campaigns").iterdir()
                  if p.name.endswith(".toml"))


def locate(name_or_path):
    """A campaign file's path: an existing file, else a shipped campaign by name."""
    path = Path(name_or_path)
    try:
        if path.is_file():
            return path
    except OSError:  # a name too long for the system: no such file
        pass
    if name_or_path in shipped():
        return Path(str(resources.files("clr_lambda_search.search").joinpath("campaigns", f"{name_or_path}.toml")))
    raise ConfigError(f"no campaign file {name_or_path!r}; give a .toml file or a shipped "
                      f"campaign ({', '.join(shipped())})")


def load_campaign(name_or_path=DEFAULT):
    """The Campaign of a TOML file (or shipped name); ConfigError naming file, key and fix."""
    path = locate(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        twice = any(w in str(e) for w in ("overwrite", "declare"))
        fix = ("a key or table is given twice (a duplicated parameter?): give it once" if twice
               else "fix the syntax there")
        raise ConfigError(f"{path}: malformed TOML ({e}); {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the campaign file ({e}); check the path") from None
    except RecursionError:  # tomllib recurses per level of [[…]] or {…}
        raise ConfigError(f"{path}: values nested too deeply to read; a campaign file needs a "
                          "few levels") from None
    return parse_campaign(raw, str(path))


def parse_campaign(raw, source="<dict>"):
    """The Campaign of a dict shaped like a campaign file."""
    where = _Where(source)
    _known(raw, _CAMPAIGN_KEYS, where, "")
    config = _config(raw.get("config", {}), where, "config")
    search = _config(raw.get("search", {}), where, "search")
    phases = raw.get("phases")
    if not isinstance(phases, list) or not phases:
        raise where.error("phases", "no phases; add at least one [[phases]] table")
    parsed = []
    for i, p in enumerate(phases):
        parsed.append(_phase(p, where, f"phases[{i}]", parsed))
    name = where.check(lambda: check_name(where.get(raw, "name", str, "", "cifar10")), "name")
    campaign = Campaign(name=name, phases=tuple(parsed),
                        final=_final(raw.get("final", {}), where),
                        seed=where.get(raw, "seed", int, "", 0), config=config, search=search,
                        source=source)
    return validated(campaign)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name, flag="name"):
    """name, if it can name studies and the folder studies/<name>/: letters, digits, '.', '_'
    and '-', starting with a letter or digit (no '/', no '..'); else ConfigError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{flag} {name!r} must be 1–100 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit: it names studies and the folder "
                          "studies/<name>/")
    return name


def validated(campaign):
    """campaign, once every phase fits it (its config, sampler and pruner work together; checked
    again after overrides changed it)."""
    where = _Where(campaign.source)
    if not (_is_count(campaign.seed) and 0 <= campaign.seed < SEED_LIMIT):
        raise where.error("seed", f"{campaign.seed!r} must be an integer in 0..{SEED_LIMIT - 1} "
                          "(Optuna's samplers take 32-bit seeds)")
    for i, phase in enumerate(campaign.phases):
        def fail(key, message, i=i):
            raise where.error(f"phases[{i}]" + (f".{key}" if key else ""), message)
        phase.validate(campaign, fail)
    campaign.final.validate(campaign, lambda key, message: _raise(where.error(key, message)))
    return campaign


def _raise(error):
    raise error


def check_first_seed(campaign, first_seed):
    """ConfigError unless the final run's seeds first_seed … + final.seeds − 1 are 32-bit."""
    last = first_seed + campaign.final.seeds - 1 if _is_count(first_seed) else None
    if last is None or first_seed < 0 or last >= SEED_LIMIT:
        raise ConfigError(f"the final run's seeds {first_seed!r}… ({campaign.final.seeds} of "
                          f"them) must lie in 0..{SEED_LIMIT - 1}; lower the first seed")


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool)


def with_phase(campaign, name, **changes):
    """campaign with phase `name` changed (dataclasses.replace of the Phase)."""
    campaign.phase(name)
    return dataclasses.replace(campaign, phases=tuple(
        dataclasses.replace(p, **changes) if p.name == name else p for p in campaign.phases))


def with_config(config, **changes):
    """A (field, value) overrides tuple with changes applied (None values ignored)."""
    return tuple({**dict(config), **{k: v for k, v in changes.items() if v is not None}}.items())


class _Where:
    """Builds the one-line errors: '<file>: <key>: <problem>; <fix>'."""

    def __init__(self, source):
        self.source = source

    def error(self, key, message):
        return ConfigError(f"{self.source}: {key}: {message}" if key else
                           f"{self.source}: {message}")

    def check(self, fn, key):
        try:
            return fn()
        except ConfigError as e:
            raise self.error(key, str(e)) from None

    def get(self, table, key, kind, prefix, default):
        value = table.get(key, default)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise self.error(f"{prefix}{key}", f"{value!r} is not a {kind.__name__}; "
                             f"write e.g. {key} = {default!r}")
        return value


def _known(table, keys, where, prefix):
    if not isinstance(table, dict):
        raise where.error(prefix.rstrip("."), f"expected a table, got {table!r}")
    for key in table:
        if key not in keys:
            raise where.error(f"{prefix}{key}", f"unknown key; use one of {', '.join(keys)}")


def _config(table, where, prefix):
    """TrainConfig overrides: known fields, values TrainConfig accepts."""
    if not isinstance(table, dict):
        raise where.error(prefix, f"expected a table of TrainConfig values, got {table!r}")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in table:
        if key not in fields:
            raise where.error(f"{prefix}.{key}", f"unknown TrainConfig field; use one of "
                              f"{', '.join(fields)}")
    where.check(lambda: TrainConfig(**table), prefix)
    return tuple(table.items())


def _phase(raw, where, key, earlier):
    _known(raw, _PHASE_KEYS + _CONFIRM_KEYS, where, f"{key}.")
    name = where.get(raw, "name", str, f"{key}.", f"phase{len(earlier)}")
    if name in [p.name for p in earlier] or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise where.error(f"{key}.name", f"{name!r} must be unique and made of letters, digits, "
                          "_ and . (it ends the study's name)")
    kind = where.get(raw, "kind", str, f"{key}.", "search")
    if kind not in _PARSERS:
        raise where.error(f"{key}.kind", f"unknown kind {kind!r}; use {', '.join(_PARSERS)}")
    return _PARSERS[kind](raw, where, key, name, earlier)


def _search_phase(raw, where, key, name, earlier):
    for k in ("from", "top_k", "seeds"):
        if k in raw:
            raise where.error(f"{key}.{k}", "belongs to a phase of kind = \"confirm\"")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise where.error(f"{key}.params", "expected a table of parameters, e.g. params.lam = "
                          "{low = 1e-5, high = 1e-1, log = true}")
    narrow = _narrow(raw.get("narrow"), where, f"{key}.narrow", earlier)
    if not params and narrow is None:
        raise where.error(key, "an empty phase: give it params (e.g. params.lam = {low = 1e-5, "
                          "high = 1e-1, log = true}) or a narrow rule")
    if params and narrow is not None:
        raise where.error(f"{key}.narrow", "a narrowed phase takes its params from the phase it "
                          "narrows; drop its params or the narrow rule")
    space, grid = _params(params, where, f"{key}.params")
    sampler = raw.get("sampler", "grid" if grid else ("tpe" if narrow else "random"))
    _known(raw, _PHASE_KEYS, where, f"{key}.")
    caps = {cap: where.get(raw, cap, int, f"{key}.", None) if cap in raw else None
            for cap in ("max_pruned", "max_failed")}
    budget = _budget(raw, where, key)
    return SearchPhase(name=name, n_trials=where.get(raw, "n_trials", int, f"{key}.",
                                                     10 if budget is None else BUDGET_TRIALS),
                       space=space, sampler=sampler, pruner=raw.get("pruner", "median"),
                       repeats=where.get(raw, "repeats", int, f"{key}.", 1),
                       config=_config(raw.get("config", {}), where, f"{key}.config"),
                       narrow=narrow, grid=grid, budget=budget, start=_start(raw, where, key),
                       **caps)


def _budget(raw, where, key):
    if "budget" not in raw:
        return None
    try:
        return parse_budget(raw["budget"])
    except ConfigError as e:
        raise where.error(f"{key}.budget", str(e)) from None


def _start(raw, where, key):
    start = raw.get("start", [])
    if not isinstance(start, list) or not all(isinstance(s, dict) and s for s in start):
        raise where.error(f"{key}.start", "a list of configurations to try first, e.g. "
                          "start = [{lam = 1e-3}, {lam = 3e-3}]")
    return tuple(start)


def _confirm_phase(raw, where, key, name, earlier):
    """A confirm phase: the best top_k configurations of earlier search phases ("from", default
    all of them), re-trained under the search protocol on `seeds` paired seeds (search.confirm)."""
    _known(raw, _CONFIRM_KEYS, where, f"{key}.")
    searches = [p.name for p in earlier if p.confirmable]
    sources = raw.get("from", searches)
    sources = [sources] if isinstance(sources, str) else sources
    if not sources or not isinstance(sources, list) or any(s not in searches for s in sources):
        raise where.error(f"{key}.from", f"{sources!r} must name earlier search phases (of "
                          f"{', '.join(searches) or 'none: add a search phase before it'})")
    return ConfirmPhase(name=name, sources=tuple(sources),
                        top_k=where.get(raw, "top_k", int, f"{key}.", CONFIRM_TOP_K),
                        seeds=where.get(raw, "seeds", int, f"{key}.", CONFIRM_SEEDS),
                        config=_config(raw.get("config", {}), where, f"{key}.config"))


_PARSERS = {SearchPhase.kind: _search_phase, ConfirmPhase.kind: _confirm_phase}


def _narrow(raw, where, key, earlier):
    if raw is None:
        return None
    _known(raw, _NARROW_KEYS, where, f"{key}.")
    source = raw.get("from")
    if source not in [p.name for p in earlier]:
        raise where.error(f"{key}.from", f"{source!r} names no earlier phase; use one of "
                          f"{', '.join(p.name for p in earlier) or '(none: this is the first)'}")
    # top_k ≥ 1 and margin in (0, MAX_MARGIN]: SearchPhase.validate (overrides are checked too)
    return {"from": source, "top_k": where.get(raw, "top_k", int, f"{key}.", 3),
            "margin": raw.get("margin", 0.25)}


def _params(table, where, key):
    """(space, grid or None) of a phase's params table."""
    params, grid = [], {}
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise where.error(f"{key}.{name}", "give a table, e.g. {low = 1e-5, high = 1e-1, "
                              "log = true} or {choices = [50, 100]}")
        _known(spec, _PARAM_KEYS, where, f"{key}.{name}.")
        param = where.check(lambda: param_from_spec(name, spec), f"{key}.{name}")
        params.append(param)
        if "values" in spec:
            grid[name] = list(param.choices) if isinstance(param, Categorical) else spec["values"]
    if grid and len(grid) != len(params):
        raise where.error(key, "a grid phase lists values for every parameter; add values = "
                          f"[…] to {', '.join(p.name for p in params if p.name not in grid)}")
    return where.check(lambda: make_space(*params), key), grid or None


def param_from_spec(name, spec):
    """A parameter from {low, high, log, step, type} or {choices} or {values} (a grid)."""
    spec = dict(spec)
    values = spec.pop("values", None)
    if "choices" in spec:
        return Categorical(name, tuple(spec["choices"]))
    kind = spec.pop("type", None) or ("int" if field_type(name) is int else "float")
    if values is not None:
        return grid_param(name, kind, values, spec.get("log", False))
    if "low" not in spec or "high" not in spec:
        raise ConfigError("give low and high (a range), choices = [...] or values = [...] (a grid)")
    if kind == "float":
        spec = {k: float(v) if k in ("low", "high") and isinstance(v, int)
                and not isinstance(v, bool) else v for k, v in spec.items()}
        return Float(name, **spec)
    if kind == "int":
        return Int(name, **spec)
    raise ConfigError(f"unknown type {kind!r}; use float or int (or choices = [...])")


def grid_param(name, kind, values, log=False):
    """The parameter a grid over `values` suggests (numeric: their range; one value: a choice)."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"values must be a non-empty list (got {values!r})")
    if len(set(values)) == 1 or not all(isinstance(v, (int, float)) for v in values):
        return Categorical(name, tuple(dict.fromkeys(values)))
    cls = {"float": Float, "int": Int}.get(kind)
    if cls is None:
        raise ConfigError(f"unknown type {kind!r}; use float or int")
    if cls is Int and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"{name} is an int field: its values must be integers (got {values})")
    low, high = min(values), max(values)
    if cls is Int:
        return Int(name, int(low), int(high), log=log)
    return Float(name, float(low), float(high), log=log)


def _final(raw, where):
    _known(raw, ("seeds", "n_s") + tuple(f.name for f in dataclasses.fields(TrainConfig)), where,
           "final.")
    table = {k: v for k, v in raw.items() if k not in ("seeds", "n_s")}
    # seeds ≥ 1 and the n_s rule: FinalRun.validate (overrides are checked too)
    return FinalRun(seeds=where.get(raw, "seeds", int, "final.", 3), n_s=raw.get("n_s", "2 epochs"),
                    config=_config(table, where, "final"))

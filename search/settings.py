"""Every setting of a campaign by its dotted name, and overrides of any of them.

    apply(campaign, {"phases.coarse.n_trials": 4, "search.n_s": 20, "final.seeds": 5})

The names follow the campaign file: `seed`, `config.<field>` and `search.<field>` (TrainConfig
fields), `phases.<phase>.<key>` (n_trials, repeats, sampler, pruner, max_pruned, max_failed,
narrow.top_k, narrow.margin, config.<field>; a confirm phase's top_k, seeds, config.<field>),
`final.seeds`, `final.n_s` and `final.<field>`. Values go through the same checks as the file's
(search.campaign.validated): an override is one more line of the file. Strings from a command
line are read as TOML values ("4", "1e-3", "true", "\"tpe\"", "{name = \"TPESampler\"}"), and
as plain strings when they are not TOML.
"""
import dataclasses
import difflib
import math
import numbers
import sys
import typing

from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.train import TrainConfig
from clr_lambda_search.search.budget import parse_budget
from clr_lambda_search.search.campaign import validated, with_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_FIELD_TYPES = typing.get_type_hints(TrainConfig)
# The kinds of value a key takes (a phase type's own keys: its `settings`); a TrainConfig field
# takes its annotated type, and TrainConfig checks its range.
COUNTS = ("n_trials", "repeats", "max_pruned", "max_failed", "top_k", "seeds", "narrow.top_k",
          "seed")
NUMBERS = ("narrow.margin",)
_EXAMPLES = {"int": 4, "float": 0.01, "finite number": 0.25, "bool": "true", "str": '"float32"'}


def keys(campaign):
    """Every dotted name an override may set in this campaign."""
    out = ["seed"] + [f"config.{f}" for f in FIELDS] + [f"search.{f}" for f in FIELDS]
    for p in campaign.phases:
        out += [f"phases.{p.name}.{k}" for k in p.settings
                if not k.startswith("narrow.") or getattr(p, "narrow", None)]
        out += [f"phases.{p.name}.config.{f}" for f in FIELDS]
    # final.seed is not a key: the final run trains seeds 0 … final.seeds − 1
    out += ["final.seeds", "final.n_s"] + [f"final.{f}" for f in FIELDS
                                           if f not in ("n_s", "seed")]
    return out


def parse_value(text):
    """A command line's value as TOML (a number, bool, string, table, list), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:  # tomllib recurses per level of [ or {
        raise ConfigError(f"--set value {text[:40]!r}… is nested too deeply") from None


def parse_pairs(pairs):
    """{key: value} of ["key=value", …] (--set); ConfigError for one without '='."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: write key=value, e.g. --set phases.coarse.n_trials=4")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply(campaign, overrides, named=None):
    """campaign with every override applied, validated; ConfigError naming an unknown key and
    the closest valid one. named: {key: how the user gave it} (a flag, for the messages; default
    the key itself)."""
    if not overrides:
        return campaign
    named = named or {}
    valid = keys(campaign)
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(_unknown(campaign, key, valid, named.get(key)))
        check_kind(key, value, named.get(key))
    try:
        for key, value in overrides.items():
            campaign = _set(campaign, key.split("."), value)
        return validated(campaign)
    except ConfigError as e:
        said = ", ".join(named.get(k, k) for k in overrides)
        raise ConfigError(f"{e} (after the overrides {said})") from None


def _unknown(campaign, key, valid, label):
    """The one line for a key campaign does not have: the closest valid key, or for a flag's
    key, what the flag would set and what the campaign has instead."""
    if label:
        parts = key.split(".")
        if parts[0] == "phases" and parts[1] not in [p.name for p in campaign.phases]:
            return (f"{label}: campaign {campaign.name} has no phase {parts[1]} (phases: "
                    f"{', '.join(p.name for p in campaign.phases)})")
        if parts[0] == "phases":
            phase = campaign.phase(parts[1])
            own = [k for k in phase.settings if not k.startswith("narrow.")
                   or getattr(phase, "narrow", None)]
            return (f"{label} does not apply to phase {phase.name} (it sets {', '.join(own)} and "
                    "its config fields)")
        return f"{label} sets {key}, which campaign {campaign.name} does not have"
    return unknown_key(key, valid, "see the campaign file's keys (phases.<name>.n_trials, "
                                   "search.n_s, final.seeds …)")


def unknown_key(key, valid, otherwise):
    """The one line for an unknown key: the closest of `valid`, else `otherwise`."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"unknown setting {key!r}; " + (f"did you mean {close[0]}?" if close else otherwise)


def config_keys():
    """The keys of one training's settings (scripts/train.py): config.<TrainConfig field>."""
    return [f"config.{f}" for f in FIELDS]


def apply_config(config, overrides):
    """A TrainConfig with overrides {"config.<field>": value} applied; ConfigError naming an
    unknown key and the closest valid one, or a bad value (TrainConfig's checks)."""
    valid = config_keys()
    values = {}
    for key, value in (overrides or {}).items():
        if key not in valid:
            raise ConfigError(unknown_key(key, valid, "use config.<field>, e.g. config.lam"))
        check_kind(key, value)
        values[key.split(".", 1)[1]] = value
    try:
        return dataclasses.replace(config, **values)
    except ConfigError as e:
        raise ConfigError(f"{e} (after the overrides {', '.join(overrides)})") from None


def get(campaign, key):
    """The value of setting `key` in campaign (a TrainConfig field not set: its default)."""
    path = key.split(".")
    head, rest = path[0], path[1:]
    if head == "seed":
        return campaign.seed
    if head in ("config", "search"):
        return dict(getattr(campaign, head)).get(rest[0], getattr(TrainConfig(), rest[0]))
    if head == "final":
        if rest[0] in ("seeds", "n_s"):
            return getattr(campaign.final, rest[0])
        return dict(campaign.final.config).get(rest[0], getattr(TrainConfig(), rest[0]))
    phase = campaign.phase(rest[0])
    key = rest[1:]
    if key[0] == "config":
        return dict(phase.config).get(key[1], getattr(TrainConfig(), key[1]))
    if key[0] == "narrow":
        return phase.narrow[key[1]]
    return getattr(phase, key[0])


def _set(c, path, value):
    head, rest = path[0], path[1:]
    if head == "seed":
        return dataclasses.replace(c, seed=value)
    if head in ("config", "search"):
        return dataclasses.replace(c, **{head: _table(getattr(c, head), rest[0], value)})
    if head == "final":
        final = c.final
        if rest[0] in ("seeds", "n_s"):
            final = dataclasses.replace(final, **{rest[0]: value})
        else:
            final = dataclasses.replace(final, config=_table(final.config, rest[0], value))
        return dataclasses.replace(c, final=final)
    phase = c.phase(rest[0])
    key = rest[1:]
    if key[0] == "config":
        changed = dataclasses.replace(phase, config=_table(phase.config, key[1], value))
    elif key[0] == "narrow":
        changed = dataclasses.replace(phase, narrow={**phase.narrow, key[1]: value})
    elif key[0] == "budget":
        try:
            changed = dataclasses.replace(phase, budget=parse_budget(value))
        except ConfigError as e:
            raise ConfigError(f"{'.'.join(path)}: {e}") from None
    elif key[0] == "start":
        if not isinstance(value, list):
            raise ConfigError(f"{'.'.join(path)}: a list of configurations, e.g. "
                              "--set 'phases.coarse.start=[{lam = 1e-3}]'")
        changed = dataclasses.replace(phase, start=tuple(value))
    else:
        changed = dataclasses.replace(phase, **{key[0]: value})
    return dataclasses.replace(c, phases=tuple(changed if p.name == phase.name else p
                                               for p in c.phases))


def _table(config, field, value):
    """A (field, value) table with one value changed, once TrainConfig takes the table alone: the
    file's check of a [config] table (a value another table overrides is still checked)."""
    table = with_config(config, **{field: value})
    TrainConfig(**dict(table))
    return table


def check_kind(key, value, label=None):
    """ConfigError when value is not of the kind key takes (its range is the file's checks');
    label: how the user gave it, when not --set (a flag)."""
    last = key.split(".")[-1]
    tail = ".".join(key.split(".")[-2:])
    if key.startswith(("config.", "search.")) or ".config." in key or (
            key.startswith("final.") and last in FIELDS and key != "final.n_s"):
        want = _FIELD_TYPES[last]
        ok = isinstance(value, bool) if want is bool else (
            isinstance(value, str) if want is str else
            isinstance(value, numbers.Integral) and not isinstance(value, bool) if want is int
            else isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
        kind = want.__name__
    elif last in COUNTS or tail in COUNTS:
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "int"
    elif tail in NUMBERS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        kind = "finite number"
    else:
        ok, kind = True, None  # sampler, pruner, final.n_s: their own checks
    if not ok:
        said = f"{label} {value!r}" if label else f"{key} = {value!r}"
        raise ConfigError(f"{said} is not a {kind}; e.g. --set {key}={_EXAMPLES.get(kind, 1)}")

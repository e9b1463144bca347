"""What the parsed flags configure: the campaign and the TrainConfig of a command.

A command's own flags are shortcuts of --set: each maps to one dotted key (search.settings) and
goes through the same settings.apply, so one path checks every value (docs/cli.md has the table).
"""
import dataclasses

from clr_lambda_search.model.train import TrainConfig


def campaign(args):
    """The Campaign of --config, renamed by --campaign when given."""
    from clr_lambda_search.search.campaign import check_name, load_campaign

    c = load_campaign(args.config)
    return c if args.campaign is None else dataclasses.replace(
        c, name=check_name(args.campaign, "--campaign"))


def resolved(args, shortcuts=(), c=None):
    """(campaign, overrides): the campaign of --config/--campaign (or c) with the flags' keys and
    then --set applied (--set wins). shortcuts: (flag, dotted key, value) of the flags; a value
    None (not given) is skipped."""
    from clr_lambda_search.search import settings

    c = campaign(args) if c is None else c
    given = [(flag, key, value) for flag, key, value in shortcuts if value is not None]
    overrides = {key: value for _, key, value in given}
    named = {key: flag for flag, key, _ in given}
    for key, value in settings.parse_pairs(getattr(args, "set", ())).items():
        overrides[key] = value
        named.pop(key, None)
    return settings.apply(c, overrides, named), overrides


def check_final_processes(c, workers):
    """ConfigError when the resolved final seeds would start too many processes at once."""
    from clr_lambda_search.model.errors import ConfigError
    from clr_lambda_search.search.cli.args import final_processes_problem

    problem = final_processes_problem(c.final.seeds, workers, "final.seeds")
    if problem:
        raise ConfigError(problem)


def train_flag_shortcuts(args, prefix, skip=()):
    """(flag, prefix + field, value) of every TrainConfig flag (None when not given)."""
    return [(f"--{f.name.replace('_', '-')}", prefix + f.name, getattr(args, f.name, None))
            for f in dataclasses.fields(TrainConfig) if f.name not in skip]


def train_config(args, **overrides):
    """TrainConfig from the parsed flags, then --set config.<field>=… (raises ConfigError on a
    bad value or an unknown key)."""
    from clr_lambda_search.search import settings

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    values.update(overrides)
    return settings.apply_config(TrainConfig(**values),
                                 settings.parse_pairs(getattr(args, "set", ())))

"""What the parsed flags configure: the campaign and the TrainConfig of a command."""
import dataclasses

from clr_lambda_search.model.train import TrainConfig


def campaign(args):
    """The Campaign of --config, renamed by --campaign when given."""
    from clr_lambda_search.search.campaign import load_campaign

    from clr_lambda_search.search.campaign import check_name

    c = load_campaign(args.config)
    return dataclasses.replace(c, name=check_name(args.campaign, "--campaign")) if args.campaign \
        else c


def given_train_flags(args, skip=()):
    """{field: value} of the TrainConfig flags given on the command line (not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def train_config(args, **overrides):
    """TrainConfig from the parsed flags (raises ConfigError on a bad value)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    values.update(overrides)
    return TrainConfig(**values)

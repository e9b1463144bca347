"""Samplers and pruners by name, and the trial seeding of every sampler.

Samplers draw from a random state seeded by (study seed, phase, trial number) before every
trial: the draws of a trial do not depend on which worker or process runs it, parallel and
resumed workers never replay one sequence (optuna #3255), a phase never replays another phase's
draws (a narrowed phase's random startup trials, where a range did not narrow), and a random
phase is reproducible trial by trial. The study seed is the campaign's, or the seed the user
gave the sampler ({name = "RandomSampler", seed = 42}, or RandomSampler(seed=42) through the API).
"""
import importlib.util
import inspect
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.search.optuna_internals import own_seed, reseed, startup_trials

# Short names of the samplers and pruners the scripts offer; any optuna.samplers / optuna.pruners
# class is nameable too, as {name = "TPESampler", multivariate = true} in a campaign file.
SAMPLERS = {"random": ("RandomSampler", {}), "tpe": ("TPESampler", {"n_startup_trials": 4}),
            "grid": ("GridSampler", {})}
PRUNERS = ("none", "median", "hyperband")
# Optional dependencies some of Optuna's samplers import only once they sample: checked up front.
_NEEDS = {"GPSampler": ("torch",), "CmaEsSampler": ("cmaes",)}


def trial_seed(study_seed, number, phase=0):
    """The seed of trial `number`'s random draws in the campaign's phase of index `phase`.

    The first phase (0) draws from (study seed, number), as before phases were seeded apart, so
    its values are those of earlier releases; the others from (study seed, number, phase): the
    phase goes last because SeedSequence ignores trailing zeros ([s, 1, 0] is [s, 1])."""
    entropy = [study_seed, number] + ([phase] if phase else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


_SEEDED_CLASSES = {}


def _seeded_class(cls):
    """cls with a before_trial that first reseeds from (study seed, trial number, phase). A direct
    subclass: Python lets an object's class be swapped only for one with the same layout."""
    if cls not in _SEEDED_CLASSES:
        def before_trial(self, study, trial):
            reseed(self, trial_seed(self.study_seed, trial.number, self.phase))
            cls.before_trial(self, study, trial)
        _SEEDED_CLASSES[cls] = type(f"TrialSeeded{cls.__name__}", (cls,),
                                    {"before_trial": before_trial, "trial_seeded": True})
    return _SEEDED_CLASSES[cls]


def trial_seeded(sampler, seed, phase=0):
    """The sampler, its draws now seeded from (study seed, trial number, phase) before every
    trial. The study seed is the one the sampler was built with, else `seed` (the campaign's).

    Works for any sampler object, a user's included: its class is swapped for a subclass that
    adds the reseeding (isinstance checks and the object's state are kept). Its own seed is read
    once, before the first reseeding replaces its random state."""
    if not getattr(sampler, "trial_seeded", False):
        sampler.own_seed = own_seed(sampler)
        sampler.__class__ = _seeded_class(type(sampler))
    sampler.study_seed = seed if sampler.own_seed is None else sampler.own_seed
    sampler.phase = phase
    return sampler


def split_spec(spec, what):
    """(name, kwargs) of a sampler or pruner given as a name or as {name = …, **kwargs}."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        kwargs = dict(spec)
        return kwargs.pop("name"), kwargs
    raise ConfigError(f"a {what} is a name or a table with a name, e.g. {{name = \"TPESampler\", "
                      f"multivariate = true}} (got {spec!r})")


def _build(cls, kwargs, what):
    try:
        with warnings.catch_warnings():  # chosen in a campaign: Optuna's notice would repeat in
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # every worker
            return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} {cls.__name__}: bad arguments ({e}); see optuna's "
                          f"documentation of {cls.__name__}") from None


def make_sampler(spec, seed, grid=None, phase=0):
    """A trial-seeded sampler (trial_seeded) of the campaign's phase of index `phase`: a short
    name (random, tpe, grid), any optuna.samplers class by name (with keyword arguments:
    {name = "TPESampler", multivariate = true, seed = 42}), or a sampler object.

    Named classes get seed=seed when they take one and none is given; grid: {param: values} for
    GridSampler.
    """
    if isinstance(spec, optuna.samplers.BaseSampler):
        return trial_seeded(spec, seed, phase)
    name, kwargs = split_spec(spec, "sampler")
    cls_name, defaults = SAMPLERS.get(name, (name, {}))
    cls = getattr(optuna.samplers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)
            and not inspect.isabstract(cls)):
        raise ConfigError(f"unknown sampler {name!r}; use {', '.join(SAMPLERS)} or an "
                          "optuna.samplers class such as TPESampler or QMCSampler")
    missing = [m for m in _NEEDS.get(cls_name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"sampler {cls_name} needs {', '.join(missing)}, which is not "
                          f"installed: pip install {' '.join(missing)}, or choose another sampler")
    kwargs = {**defaults, **kwargs}
    if cls is optuna.samplers.GridSampler:
        kwargs.setdefault("search_space", grid or {})
    if "seed" in inspect.signature(cls).parameters:
        kwargs.setdefault("seed", seed)
    return trial_seeded(_build(cls, kwargs, "sampler"), seed, phase)


def sampler_label(spec):
    """What a study records of its sampler: the spec, or an object's class name."""
    if isinstance(spec, optuna.samplers.BaseSampler):
        return type(spec).__name__.removeprefix("TrialSeeded")
    return spec


class MarginMedianPruner(optuna.pruners.BasePruner):
    """Median pruning that tolerates the noise of the validation accuracy.

    A plain median rule prunes half of the trials whose λ are equally good, on noise alone (the
    accuracy of a 1,000-image validation set has a std of ~1.6 points). This one prunes a trial
    only when its value at a step is more than `margin` below the median of the completed trials'
    values at that step: it stops λ that are clearly too large, not the lucky draw's neighbours.
    """

    def __init__(self, margin=0.02, n_startup_trials=5, n_warmup_steps=0):
        self.margin = margin
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study, trial):
        step = trial.last_step
        if step is None or step <= self.n_warmup_steps:
            return False
        others = [t.intermediate_values[step] for t in
                  study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if step in t.intermediate_values]
        if len(others) < self.n_startup_trials:
            return False
        return trial.intermediate_values[step] < float(np.median(others)) - self.margin


def make_pruner(spec, config):
    """A pruner: none, median (MarginMedianPruner, judging from the first full cycle on: the first
    half cycle ends at η_max, where accuracy is noisy), hyperband (resources in updates), any
    optuna.pruners class or MarginMedianPruner by name with keyword arguments, or a pruner object.
    Pruners see the first seed's validation accuracy at every half cycle (step = update)."""
    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    name, kwargs = split_spec(spec, "pruner")
    short = {"none": (optuna.pruners.NopPruner, {}),
             "median": (MarginMedianPruner, {"n_startup_trials": 5,
                                             "n_warmup_steps": config.n_s}),
             "hyperband": (optuna.pruners.HyperbandPruner,
                           {"min_resource": config.n_s, "max_resource": config.total_steps,
                            "reduction_factor": 3})}
    cls, defaults = short.get(name, (getattr(optuna.pruners, name, None), {}))
    if name == MarginMedianPruner.__name__:
        cls = MarginMedianPruner
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)
            and not inspect.isabstract(cls)):
        raise ConfigError(f"unknown pruner {name!r}; use {', '.join(PRUNERS)}, "
                          "MarginMedianPruner or an optuna.pruners class such as MedianPruner")
    return _build(cls, {**defaults, **kwargs}, "pruner")


def pruner_label(spec):
    return type(spec).__name__ if isinstance(spec, optuna.pruners.BasePruner) else spec


# ---- exercised before a real study exists -------------------------------------------------------

MAX_EXERCISE = 20  # scratch trials at most: past the startup trials, where lazy arguments break


def exercise(sampler, pruner, space, config, n_trials, suggest):
    """Run a few trials of a sampler and a pruner (built objects) on a scratch in-memory study
    with the phase's space (suggest(trial, space)), reporting at the pruner's steps: keyword
    arguments a class takes but that break only when it samples or prunes (TPESampler(gamma=1),
    BruteForceSampler on a continuous range, a pruner's margin = "x") fail here, before a real
    study exists. ConfigError naming the sampler or pruner (its .key: "sampler" or "pruner")."""
    steps = [config.n_s * k for k in range(1, 2 * config.cycles + 1)]
    state = {"stage": "sampler"}

    def objective(trial):
        state["stage"] = "sampler"
        suggest(trial, space)
        value = 0.1 + 0.8 * ((trial.number * 7919) % 97) / 97  # spread values: medians differ
        state["stage"] = "pruner"
        for step in steps:
            trial.report(value * step / steps[-1], step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        state["stage"] = "sampler"
        return value

    n = min(n_trials, max(_startup(sampler), _startup(pruner)) + 2, MAX_EXERCISE)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the scratch study's lines are noise
    try:
        with warnings.catch_warnings():  # the real study warns once, where it counts
            warnings.simplefilter("ignore")
            study = optuna.create_study(storage=None, direction="maximize", sampler=sampler,
                                        pruner=pruner)
            study.optimize(objective, n_trials=max(n, 1), catch=())
    except Exception as e:  # any failure of a user's sampler or pruner on this space is input
        what = type(sampler if state["stage"] == "sampler" else pruner).__name__
        error = ConfigError(f"{what.removeprefix('TrialSeeded')} fails on this phase's space "
                            f"({type(e).__name__}: {str(e)[:200]}); fix its arguments or choose "
                            "another")
        error.key = state["stage"]  # the campaign key to name
        raise error from None
    finally:
        optuna.logging.set_verbosity(verbosity)


def _startup(obj):
    """The trials an object waits before its own rule applies (n_startup_trials): its attribute,
    else its constructor's default."""
    value = startup_trials(obj)
    if isinstance(value, int) and not isinstance(value, bool):
        return min(value, MAX_EXERCISE)
    default = inspect.signature(type(obj)).parameters.get("n_startup_trials")
    return default.default if default is not None and isinstance(default.default, int) else 0

"""The coarse and fine phases: their protocols, their studies, and the derived fine range."""
import dataclasses
import logging

import optuna

from model.errors import InputError
from model.train import TrainConfig
from search.space import (COARSE_LAM, FINE_MARGIN_DECADES, FINE_TOP_K, fine_range, lam_space,
                          space_from_dict, space_to_dict)
from search.study import finished_trials, load_study, study_name

log = logging.getLogger(__name__)

# The report's search protocol: 2 cycles of n_s = 800 (3,200 updates), validation at half cycles.
SEARCH_CONFIG = TrainConfig(n_s=800, cycles=2, evals_per_cycle=2, eval_train_samples=5000)
DEFAULT_TRIALS = {"coarse": 10, "fine": 12}
DEFAULT_SAMPLER = {"coarse": "random", "fine": "tpe"}

# Settings that must match when a study is resumed: changing them would mix incomparable trials.
_PINNED = ("config", "repeats", "space")


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    campaign: str
    phase: str                    # coarse | fine
    n_trials: int                 # finished trials the phase ends with
    config: TrainConfig           # training protocol of every trial (λ is overridden)
    space: tuple                  # search.space.Param, ...
    sampler: str = "random"       # random | tpe | grid
    grid: tuple = ()              # λ values for the grid sampler
    pruner: str = "median"
    repeats: int = 1              # seeds per λ
    seed: int = 0                 # sampler seed of the study

    @property
    def study_name(self):
        return study_name(self.campaign, self.phase)

    def attrs(self):
        """What the study records about itself (user attrs)."""
        config = dataclasses.asdict(self.config)
        config.pop("lam")
        return {"campaign": self.campaign, "phase": self.phase, "config": config,
                "space": space_to_dict(self.space), "sampler": self.sampler,
                "grid": list(self.grid), "pruner": self.pruner, "repeats": self.repeats,
                "seed": self.seed}


def create_or_resume(storage, spec):
    """Create the phase's study (recording spec) or check that an existing one matches it."""
    study = optuna.create_study(study_name=spec.study_name, storage=storage, direction="maximize",
                                load_if_exists=True)
    recorded = study.user_attrs
    if not recorded:
        for key, value in spec.attrs().items():
            study.set_user_attr(key, value)
        return study
    wanted = spec.attrs()
    for key in _PINNED:
        if recorded.get(key) != wanted[key]:
            raise InputError(f"study {spec.study_name} was started with other {key} settings "
                             f"({recorded.get(key)}); resume with the same flags or use a new "
                             "--campaign")
    return study


def coarse_space(low=None, high=None):
    return lam_space(low or COARSE_LAM[0], high or COARSE_LAM[1])


def derive_fine(storage, campaign, top_k=FINE_TOP_K, margin=FINE_MARGIN_DECADES):
    """The fine λ space and how it was derived, from the campaign's coarse study.

    Raises InputError when the coarse study is missing or has fewer than top_k complete trials.
    """
    coarse = load_study(storage, study_name(campaign, "coarse"))
    best = finished_trials(coarse)[:top_k]
    if len(best) < top_k:
        raise InputError(f"the coarse study {coarse.study_name} has {len(best)} complete trials; "
                         f"the fine phase needs at least {top_k}: run or resume the coarse phase")
    bounds = tuple(p for p in space_from_dict(coarse.user_attrs["space"]) if p.name == "lam")[0]
    low, high = fine_range([t.params["lam"] for t in best], (bounds.low, bounds.high), margin)
    info = {"low": low, "high": high, "coarse_study": coarse.study_name,
            "from_trials": [t.number for t in best],
            "rule": f"log10 span of the best {top_k} coarse trials ± {margin} decades, clipped to "
                    f"[{bounds.low:g}, {bounds.high:g}]"}
    return lam_space(low, high), info


def fine_info(storage, campaign):
    """The fine range recorded in the fine study, or None."""
    try:
        fine = load_study(storage, study_name(campaign, "fine"))
    except InputError:
        return None
    return fine.user_attrs.get("fine_range")

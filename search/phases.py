"""The coarse and fine phases: their protocols, their studies, and the derived fine range."""
import dataclasses
import logging

import optuna

from model.errors import InputError, WorkersFailed
from model.train import TrainConfig
from search.objective import Objective
from search.runner import make_pruner, make_sampler, n_done, recover_trials, run_workers
from search.space import (COARSE_LAM, FINE_MARGIN_DECADES, FINE_TOP_K, fine_range, lam_space,
                          space_from_dict, space_to_dict)
from search.study import finished_trials, load_study, study_name

log = logging.getLogger(__name__)

# The report's search protocol: 2 cycles of n_s = 800 (3,200 updates), validation at half cycles.
# A trial's train metrics are reported, never searched on: 1,000 training images estimate them as
# precisely as the 1,000 validation images do, and make an evaluation point cost ~10 steps, not ~30.
SEARCH_CONFIG = TrainConfig(n_s=800, cycles=2, evals_per_cycle=2, eval_train_samples=1000)
DEFAULT_TRIALS = {"coarse": 10, "fine": 12}
DEFAULT_SAMPLER = {"coarse": "random", "fine": "tpe"}

# Settings that must match when a study is resumed: changing them would mix incomparable trials.
_PINNED = ("config", "repeats", "space")


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    campaign: str
    phase: str                    # coarse | fine
    n_trials: int                 # COMPLETE trials the phase ends with (values tried, for a grid)
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
    wanted = spec.attrs()
    for key in _PINNED:
        # a key not there yet may be being written by a process that created the study just now
        if key in recorded and recorded[key] != wanted[key]:
            raise InputError(f"study {spec.study_name} was started with other {key} settings "
                             f"({recorded[key]}); resume with the same flags or use a new "
                             "--campaign")
    for key, value in wanted.items():
        if key not in recorded:
            study.set_user_attr(key, value)
    return study


def coarse_space(low=None, high=None):
    """The coarse λ space; None keeps the report's bound (an explicit 0 is refused, not replaced)."""
    return lam_space(COARSE_LAM[0] if low is None else low, COARSE_LAM[1] if high is None else high)


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


def make_fine_spec(storage, n_trials=None, sampler=None, values=None, top_k=FINE_TOP_K,
                   margin=FINE_MARGIN_DECADES, **common):
    """The fine PhaseSpec and its range info (None when resumed or given --values).

    common: campaign, config, pruner, repeats, seed (as PhaseSpec). With values, a grid over them;
    else the range recorded by an earlier run of this fine study, else one derived from coarse.
    """
    if values:
        return PhaseSpec(phase="fine", n_trials=n_trials or len(values),
                         space=lam_space(values[0], values[-1]), sampler="grid", grid=tuple(values),
                         **common), None
    recorded = fine_info(storage, common["campaign"])
    if recorded:
        space, info = lam_space(recorded["low"], recorded["high"]), None
    else:
        space, info = derive_fine(storage, common["campaign"], top_k, margin)
    return PhaseSpec(phase="fine", n_trials=n_trials or DEFAULT_TRIALS["fine"], space=space,
                     sampler=sampler or DEFAULT_SAMPLER["fine"], **common), info


def run_phase(spec, storage, storage_url, data, workers=1, storage_opts=None, progress=None,
              fine_range=None):
    """Run (or resume) the phase until its study holds spec.n_trials complete trials.

    The study is created here, before any worker starts (concurrent creation races). progress:
    optional callable(n_complete) for a progress bar. Returns the study.
    """
    study = create_or_resume(storage, spec)
    if fine_range:
        study.set_user_attr("fine_range", fine_range)
    recover_trials(study)  # once, before the workers: they would all re-queue the same trials
    storage.remove_session()
    storage.engine.dispose()  # forked workers must open their own connections
    grid = {"lam": list(spec.grid)} if spec.grid else None
    is_grid = spec.sampler == "grid"  # every value is tried once: a diverged one counts as tried
    codes = run_workers(
        workers, progress=(lambda: progress(n_done(study, is_grid))) if progress else None,
        storage_url=storage_url, study_name=spec.study_name,
        objective=Objective(data, spec.config, spec.space, repeats=spec.repeats),
        target=spec.n_trials, pruner=make_pruner(spec.pruner, spec.config),
        make_sampler=lambda: make_sampler(spec.sampler, spec.seed, grid),
        storage_opts=storage_opts, count_diverged=is_grid)
    if any(codes) or n_done(study, is_grid) < spec.n_trials:
        raise WorkersFailed(f"{spec.study_name}: workers exited with codes {codes} before "
                            f"{spec.n_trials} complete trials; re-run the same command to resume")
    return study


def best_lam(storage, campaign):
    """(λ, source) of the campaign's best trial: the fine study's, else the coarse study's.

    source = {"study", "trial", "val_acc", "phase"}. InputError for an unknown campaign or one
    without a complete trial.
    """
    names = set(optuna.get_all_study_names(storage))
    for phase in ("fine", "coarse"):
        name = study_name(campaign, phase)
        if name not in names:
            continue
        done = finished_trials(optuna.load_study(study_name=name, storage=storage))
        if done:
            return done[0].params["lam"], {"study": name, "phase": phase,
                                           "trial": done[0].number, "val_acc": done[0].value}
    if not any(study_name(campaign, ph) in names for ph in ("fine", "coarse")):
        raise InputError(f"no campaign {campaign!r} in the storage; run scripts/search.py coarse "
                         "--campaign NAME first, or pass --lam")
    raise InputError(f"campaign {campaign!r} has no complete trial yet; run or resume its search "
                     "first, or pass --lam")

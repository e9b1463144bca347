"""A campaign's phases: their resolved specs, their studies, narrowing, running, the best trial."""
import dataclasses
import logging
import warnings

import optuna

from model.dataset import fingerprint
from model.errors import InputError, WorkersFailed
from model.train import TrainConfig
from search.campaign import load_campaign, source_space
from search.objective import Objective
from search.runner import (make_pruner, make_sampler, n_done, pruner_label, recover_trials,
                           run_workers, sampler_label)
from search.space import is_typed, narrow, space_from_dict, space_to_dict
from search.study import campaign_studies, finished_trials, load_study, study_name

log = logging.getLogger(__name__)

METRIC = "val_acc"  # the objective's name in Optuna's tools (our own figures: validation accuracy)
# Settings that must match when a study is resumed: changing them would mix incomparable trials.
_PINNED = ("space", "config", "repeats", "data_fingerprint")


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    """A phase, resolved: what its study runs and records."""

    campaign: str
    phase: str
    n_trials: int                 # COMPLETE trials the phase ends with (values tried, for a grid)
    config: TrainConfig           # training protocol of every trial (the space's fields overridden)
    space: object                 # search.space parameters, or a define-by-run callable
    sampler: object = "random"    # see search.runner.make_sampler
    grid: object = None           # {param: values} for the grid sampler
    pruner: object = "median"     # see search.runner.make_pruner
    repeats: int = 1              # seeds per trial
    seed: int = 0                 # sampler seed of the study
    index: int = 0                # the phase's position in its campaign
    digest: str = None            # of the resolved campaign
    narrowed: dict = None         # how the space was derived from an earlier phase
    name: str = None              # the study's name (default <campaign>-<phase>)

    @property
    def study_name(self):
        return self.name or study_name(self.campaign, self.phase)

    def attrs(self):
        """What the study records about itself (user attrs): the phase's resolved spec."""
        config = dataclasses.asdict(self.config)
        for name in searched(self.space):
            config.pop(name)
        attrs = {"campaign": self.campaign, "phase": self.phase, "phase_index": self.index,
                 "config": config, "space": space_to_dict(self.space),
                 "sampler": sampler_label(self.sampler), "grid": self.grid,
                 "pruner": pruner_label(self.pruner), "repeats": self.repeats, "seed": self.seed}
        if self.digest:
            attrs["campaign_digest"] = self.digest
        if self.narrowed:
            attrs["narrowed"] = self.narrowed
        return attrs


def searched(space):
    """The names a typed space sets (none known for a define-by-run callable)."""
    return [p.name for p in space] if is_typed(space) else []


def phase_spec(campaign, name, storage=None):
    """The PhaseSpec of campaign's phase `name` (a Campaign, or a file / shipped name).

    A narrowed phase takes the space recorded by an earlier run of its study (a resumed phase
    keeps its ranges), else derives it from the phase it narrows (InputError when that study is
    missing or has too few complete trials).
    """
    campaign = load_campaign(campaign) if isinstance(campaign, str) else campaign
    phase = campaign.phase(name)
    spec = PhaseSpec(campaign=campaign.name, phase=name, n_trials=phase.n_trials,
                     config=campaign.phase_config(phase), space=phase.space,
                     sampler=phase.sampler, grid=phase.grid, pruner=phase.pruner,
                     repeats=phase.repeats, seed=campaign.seed, index=campaign.index(name),
                     digest=campaign.digest())
    if not phase.narrow:
        return spec
    recorded = recorded_space(storage, spec.study_name)
    if recorded is not None:
        return dataclasses.replace(spec, space=recorded)
    space, info = derive(storage, campaign, phase)
    return dataclasses.replace(spec, space=space, narrowed=info)


def recorded_space(storage, name):
    """The space an existing study recorded, or None."""
    if storage is None or name not in optuna.get_all_study_names(storage):
        return None
    items = optuna.load_study(study_name=name, storage=storage).user_attrs.get("space")
    return space_from_dict(items) if items else None


def derive(storage, campaign, phase):
    """The narrowed space of `phase` and how it was derived: for each parameter of the phase it
    narrows, the span of that study's best top_k trials, widened by the margin (search.space.
    narrow) and clipped to that study's own range."""
    rule = phase.narrow
    source = study_name(campaign.name, rule["from"])
    if storage is None:
        raise InputError(f"phase {phase.name} narrows {source}, which needs the storage")
    study = load_study(storage, source)
    best = finished_trials(study)[:rule["top_k"]]
    if len(best) < rule["top_k"]:
        raise InputError(f"the study {source} has {len(best)} complete trials; phase "
                         f"{phase.name} narrows the best {rule['top_k']}: run or resume "
                         f"phase {rule['from']} first")
    bounds = recorded_space(storage, source) or source_space(campaign, phase)
    space = tuple(narrow(p, [t.params[p.name] for t in best], rule["margin"]) for p in bounds)
    info = {"from_study": source, "from_trials": [t.number for t in best],
            "top_k": rule["top_k"], "margin": rule["margin"],
            "rule": f"span of the best {rule['top_k']} trials of {source}, ± {rule['margin']} "
                    "decades (log) or × the span (linear), clipped to its range"}
    return space, info


def create_or_resume(storage, spec, data_fingerprint=None):
    """Create the phase's study (recording spec and the data's fingerprint) or check that an
    existing one is ours and matches them: trials scored on other data, or by another program,
    must never be ranked with this phase's."""
    check_foreign(storage, spec.study_name)
    study = optuna.create_study(study_name=spec.study_name, storage=storage, direction="maximize",
                                load_if_exists=True)
    recorded = study.user_attrs
    wanted = spec.attrs()
    if data_fingerprint:
        wanted["data_fingerprint"] = data_fingerprint
    for key in _PINNED:
        # a key not there yet may be being written by a process that created the study just now
        # (or, the fingerprint, by a release before fingerprints: it is recorded below)
        if key in recorded and key in wanted and not _same(key, recorded[key], wanted[key]):
            raise InputError(_changed(spec.study_name, key, recorded[key]))
    for key, value in wanted.items():
        if key not in recorded:
            study.set_user_attr(key, value)
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC])
    return study


def check_foreign(storage, name):
    """InputError when a study of this name exists but is not one of ours: another direction or
    several objectives, or trials without the attrs every phase of ours records. (A study just
    created by a concurrent worker has neither trials nor attrs yet: it is ours.)"""
    if name not in optuna.get_all_study_names(storage):
        return
    study = optuna.load_study(study_name=name, storage=storage)
    fix = "it was made by another program or another tool; use a new --campaign (or --storage)"
    if len(study.directions) != 1 or study.directions[0] != optuna.study.StudyDirection.MAXIMIZE:
        raise InputError(f"study {name} exists with direction(s) "
                         f"{[d.name.lower() for d in study.directions]}, not one maximised "
                         f"validation accuracy: {fix}")
    if "phase" not in study.user_attrs and study.get_trials(deepcopy=False):
        raise InputError(f"study {name} exists and holds trials, but not this project's records: "
                         f"{fix}")


def _changed(name, key, recorded):
    """The one line refusing to resume study `name` whose pinned setting `key` differs."""
    if key == "data_fingerprint":
        return (f"study {name} was run on other data (another data set, split or --n-val: its "
                "data fingerprint differs); resume with the same data or use a new --campaign")
    return (f"study {name} was started with other {key} settings ({recorded}); resume with the "
            "same settings or use a new --campaign")


def _same(key, recorded, wanted):
    """Whether a recorded setting equals the wanted one. A config recorded before TrainConfig
    gained a field had that field's default; spaces compare as parameters (the releases that
    searched λ alone recorded {name, low, high, log}); a define-by-run space is not compared."""
    if key == "config":
        defaults = dataclasses.asdict(TrainConfig())
        return {**{k: defaults[k] for k in wanted if k not in recorded}, **recorded} == wanted
    if key == "space":
        return recorded is None or wanted is None or space_from_dict(recorded) == space_from_dict(wanted)
    return recorded == wanted


def run_spec(spec, storage, data, workers=1, storage_opts=None, progress=None):
    """Run (or resume) the phase until its study holds spec.n_trials complete trials.

    The study is created here, before any worker starts (concurrent creation races); workers
    open storage.url themselves. progress: optional callable(n_complete) for a progress bar.
    Returns the study.
    """
    study = create_or_resume(storage, spec, fingerprint(data))
    is_grid = spec.grid is not None  # every value is tried once: a diverged one counts as tried
    codes = run_to(study, spec, storage, Objective(data, spec.config, spec.space,
                                                   repeats=spec.repeats),
                   spec.n_trials, workers, storage_opts, progress, count_diverged=is_grid)
    if any(codes) or n_done(study, is_grid) < spec.n_trials:
        raise WorkersFailed(f"{spec.study_name}: workers exited with codes {codes} before "
                            f"{spec.n_trials} complete trials; re-run the same command to resume")
    return study


def run_to(study, spec, storage, objective, target, workers=1, storage_opts=None, progress=None,
           count_diverged=False):
    """Run workers on study (with spec's sampler and pruner) until it holds `target` done trials
    (search.runner.work); returns their exit codes. Dead and terminated trials are re-queued once
    here, before the workers: they would all re-queue the same trials."""
    recover_trials(study)
    storage.remove_session()
    storage.engine.dispose()  # forked workers must open their own connections
    return run_workers(
        workers, progress=(lambda: progress(n_done(study, count_diverged))) if progress else None,
        storage_url=storage.url, study_name=study.study_name, objective=objective, target=target,
        pruner=make_pruner(spec.pruner, spec.config),
        make_sampler=lambda: make_sampler(spec.sampler, spec.seed, spec.grid),
        storage_opts=storage_opts, count_diverged=count_diverged)


def best_params(study):
    """{name: value} of the study's best complete trial, or None."""
    done = finished_trials(study)
    return dict(done[0].params) if done else None


def campaign_best(storage, campaign):
    """(params, source) of the campaign's best trial: that of its last phase with a complete
    trial. source = {"study", "phase", "trial", "val_acc"}. InputError for an unknown campaign
    or one without a complete trial."""
    for study in reversed(campaign_studies(storage, campaign)):
        verdict = study.user_attrs.get("verdict")
        if study.user_attrs.get("kind") == "confirm" and isinstance(verdict, dict):
            return dict(verdict["params"]), {"study": study.study_name,
                                             "phase": study.user_attrs.get("phase"),
                                             "trial": None, "val_acc": verdict["means"][
                                                 str(verdict["pick"])]}
        done = finished_trials(study)
        if done and study.user_attrs.get("kind") != "confirm":
            return dict(done[0].params), {"study": study.study_name,
                                          "phase": study.user_attrs.get("phase"),
                                          "trial": done[0].number, "val_acc": done[0].value}
    raise InputError(f"campaign {campaign!r} has no complete trial yet; run or resume its search "
                     "first, or give the parameters (e.g. --lam)")

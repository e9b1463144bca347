"""Launching studies from Python: a whole campaign (every phase, the final run, the outputs) or one
search phase with your own space, sampler and pruner. Both resume, run parallel workers, share
the work with other runners of the same storage and retry the trials of dead workers, as the
scripts do (they call the same core, search.core).

    from clr_lambda_search.search.api import run_campaign
    result = run_campaign("dd2424", data, "sqlite:///studies/studies.db",
                          overrides={"phases.coarse.n_trials": 4, "final.seeds": 2})
    print(result.pick, result.verdict["sentence"], result.test_acc)
"""
import numbers

from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.model.train import TrainConfig
from clr_lambda_search.search import core, settings
from clr_lambda_search.search.campaign import Campaign, check_name, load_campaign, validated
from clr_lambda_search.search.phases import SearchPhase
from clr_lambda_search.search.space import is_typed, make_space
from clr_lambda_search.search.study import mask_url, open_storage


def run_campaign(campaign, data, storage, *, overrides=None, workers=1, out_dir=None,
                 force_final=False, progress=None, dashboard=True):
    """Run (or resume) a campaign: every phase in order, then the final run and its outputs;
    returns a search.core.CampaignResult (pick, verdict, per-phase studies and summaries, final
    metrics, where the files are).

    campaign: a search.campaign.Campaign, a campaign file's path or a shipped campaign's name.
    overrides: {dotted name: value} as on the command line's --set (search.settings), e.g.
      {"search.n_s": 20, "phases.coarse.n_trials": 4, "final.seeds": 2}.
    storage: an SQLAlchemy URL or a search.study.open_storage(...) storage.
    out_dir: where the results folder and the dashboard go (default studies/<campaign>, or
      studies/<campaign>-<digest> for a storage other than the default: search.study.outputs_dir).
    progress: optional callable(study_name, done, total, unit).
    dashboard: write the campaign's dashboard page (plotly) beside the results.
    Everything is checked before the storage is opened.
    """
    c = load_campaign(campaign) if isinstance(campaign, str) else campaign
    c = settings.apply(c, overrides)
    core.check_workers(workers)
    storage = open_storage(storage) if isinstance(storage, str) else storage
    make = core.dashboard_maker(c.name, storage, mask_url(storage.url)) if dashboard else None
    return core.run_campaign(c, data, storage, workers=workers, out_dir=out_dir,
                             force_final=force_final, progress=progress, make_dashboard=make)


def run_phase(name, space, data, storage, *, n_trials, config=TrainConfig(), sampler="random",
              pruner="median", repeats=1, seed=0, workers=1, progress=None):
    """Run (or resume) the study `name` until it holds n_trials COMPLETE trials; returns it.

    Args:
      name: the study's name (also its campaign's, for scripts/search.py status --campaign).
      space: search.space parameters (Float, Int, Categorical), or a define-by-run callable
        trial -> {TrainConfig field: value} (not checked on resume: nothing describes it).
      data: model.dataset.load_cifar10(...) or any Dataset.
      storage: an SQLAlchemy URL or a search.study.open_storage(...) storage.
      config: the TrainConfig every trial starts from (the space's fields are overridden).
      sampler, pruner: Optuna objects, or names as in a campaign file. A sampler is reseeded
        from (study seed, trial number) before each trial, so parallel workers never replay
        draws; the study seed is the sampler's own when it was built with one
        (RandomSampler(seed=42)), else `seed`.
      repeats: training seeds per trial (the objective is their mean).
      workers: processes on this machine (forked: the data is shared).
      progress: optional callable(study_name, done, total, unit).
    """
    check_name(name, "name")  # it names the study and studies/<name>/, as in a campaign file
    for what, value in (("n_trials", n_trials), ("repeats", repeats)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{what} must be a whole number ≥ 1 (got {value!r})")
    core.check_workers(workers)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a model.train.TrainConfig (got {type(config).__name__})")
    if is_typed(space):
        space = make_space(*space)
    elif not callable(space):
        raise ConfigError("space is a tuple of search.space parameters or a callable trial -> "
                          "{field: value}")
    phase = SearchPhase(name="search", study=name, n_trials=n_trials, space=space,
                        sampler=sampler, pruner=pruner, repeats=repeats)
    campaign = validated(Campaign(name=name, phases=(phase,), seed=seed,
                                  config=tuple(vars(config).items())))
    storage = open_storage(storage) if isinstance(storage, str) else storage
    study, _ = core.run_phase(campaign, "search", data, storage, workers=workers,
                              progress=progress)
    return study

"""Launching studies from Python: run a phase with your own space, sampler and pruner, or a whole
campaign. Both resume, run parallel workers and retry the trials of dead workers as the scripts do.

    from search.api import run_phase
    study = run_phase("mine", (Float("lam", 1e-5, 1e-1, log=True),), data,
                      "sqlite:///studies/mine.db", n_trials=20,
                      sampler=optuna.samplers.TPESampler(multivariate=True))
"""
from model.train import TrainConfig
from search.campaign import load_campaign
from search.phases import PhaseSpec, phase_spec, run_spec
from search.study import open_storage


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
        from (seed, trial number) before each trial, so parallel workers never replay draws.
      repeats: training seeds per trial (the objective is their mean).
      workers: processes on this machine (forked: the data is shared).
      progress: optional callable(n_complete).
    """
    storage = open_storage(storage) if isinstance(storage, str) else storage
    spec = PhaseSpec(campaign=name, phase="search", name=name, n_trials=n_trials, config=config,
                     space=space, sampler=sampler, pruner=pruner, repeats=repeats, seed=seed)
    return run_spec(spec, storage, data, workers=workers, progress=progress)


def run_campaign(campaign, data, storage, *, workers=1):
    """Run (or resume) every search phase of a campaign in order; returns their studies.

    campaign: a search.campaign.Campaign, a campaign file's path or a shipped campaign's name.
    The final run is scripts/final.py's (or search.final.run_final with
    search.campaign.final_config and search.phases.campaign_best).
    """
    campaign = load_campaign(campaign) if isinstance(campaign, str) else campaign
    storage = open_storage(storage) if isinstance(storage, str) else storage
    return [run_spec(phase_spec(campaign, phase.name, storage), storage, data, workers=workers)
            for phase in campaign.phases]

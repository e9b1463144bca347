"""The campaign core: every surface (the scripts, the Python API, the bench) runs a campaign here.

    result = run_campaign(campaign, data, storage, workers=2, out_dir="studies/cifar10")

runs its phases in order, each by its type (search.phases), then the final run
(search.final.FinalRun) and the outputs (the results folder and the dashboard), reporting
progress through a callback. Any number of runners (processes, machines) may run one campaign
against one storage at once: they share each phase's work and end with the same studies as one
runner (search.workers for the trials, search.lock for what must happen once).
"""
import dataclasses
import functools
import logging
import numbers
import time
from pathlib import Path

import numpy as np
import optuna

from clr_lambda_search.model.dataset import fingerprint
from clr_lambda_search.model.errors import ConfigError, DivergedError, InputError
from clr_lambda_search.model.gradcheck import gradcheck_report
from clr_lambda_search.search import record
from clr_lambda_search.search.campaign import Campaign, check_first_seed, load_campaign, validated
from clr_lambda_search.search.final import final_study_name, read_final, retire_final
from clr_lambda_search.search.phases import PhaseRun
from clr_lambda_search.search.report import best_row, narrowing, phase_spec
from clr_lambda_search.search.study import campaign_studies, open_storage, outputs_dir, retire_study

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CampaignResult:
    """What a campaign ended with: the pick and its verdict, each phase's study and summary, the
    final run's metrics, and where the files are."""

    campaign: str
    pick: dict                    # the parameters the final run trained
    source: dict                  # where they came from ({"study", "phase", "trial", "val_acc"})
    verdict: dict                 # the confirm phase's, or None
    studies: list                 # the phases' study names, in order (the final study last)
    phases: list                  # per phase: {"study", "space", "narrowed", "best"}
    final: dict                   # metrics.json of the final run
    outputs: dict                 # {"final": results folder, "dashboard": page}
    gradcheck: dict = None
    seconds: float = None

    @property
    def test_acc(self):
        return self.final["test_acc_mean"]


def run_context(campaign, data, storage, *, workers=1, storage_opts=None, progress=None):
    """The PhaseRun every phase of this runner runs with; everything checked before the storage
    is opened (a Campaign made in Python as one read from a file)."""
    campaign = load_campaign(campaign) if isinstance(campaign, str) else campaign
    if not isinstance(campaign, Campaign):
        raise ConfigError(f"campaign must be a search.campaign.Campaign, a campaign file or a "
                          f"shipped campaign's name (got {type(campaign).__name__})")
    campaign = validated(campaign)
    check_workers(workers)
    storage = open_storage(storage, **(storage_opts or {})) if isinstance(storage, str) \
        else storage
    return PhaseRun(campaign=campaign, storage=storage, data=data, workers=workers,
                    storage_opts=storage_opts, progress=progress,
                    fingerprint=fingerprint(data) if data is not None else None)


def run_campaign(campaign, data, storage, *, workers=1, out_dir=None, protect=(),
                 force_final=False, gradcheck=True, progress=None, storage_opts=None,
                 on_step=None, make_dashboard=None):
    """Run (or resume) a whole campaign: gradient check, every phase, the final run, the
    outputs; returns a CampaignResult.

    campaign: a search.campaign.Campaign (overrides applied: search.settings.apply).
    storage: an SQLAlchemy URL or a search.study.open_storage storage.
    out_dir: the results folder's parent (default search.study.outputs_dir: studies/<campaign>
      for the default storage, studies/<campaign>-<digest of the URL> for another).
    progress: optional callable(study_name, done, total, unit).
    on_step: optional callable(i, n, text) as each step starts (the scripts print it).
    make_dashboard: optional callable() -> an object with .html(final) (the dashboard page),
      called first while the final run's last seed trains and a CPU is free.
    """
    start = time.perf_counter()
    run = run_context(campaign, data, storage, workers=workers, storage_opts=storage_opts,
                      progress=progress)
    c = run.campaign
    out_dir = Path(out_dir or outputs_dir(c.name, storage))
    n = len(c.phases) + 3
    step = on_step or (lambda i, n, text: log.info("[%d/%d] %s", i, n, text))
    check = None
    if gradcheck:
        step(1, n, "gradient check")
        check = gradient_check(data)
    for i, phase in enumerate(c.phases, start=2):
        step(i, n, phase.study_name(c.name))
        phase.run(run)
    pick, source = campaign_best(run)
    step(n - 1, n, "final run")
    metrics = c.final.run(run, pick, source, out_dir / "final", protect=protect,
                          force=force_final, on_cpu_free=make_dashboard)
    dashboard = None
    if make_dashboard is not None:
        step(n, n, "dashboard")
        dashboard = write_dashboard(make_dashboard(), out_dir, protect)
    return result_of(run, metrics, out_dir, dashboard, check, time.perf_counter() - start)


def gradient_check(data):
    """The analytic-vs-numerical gradient check on a slice of the data (DivergedError when it
    fails: nothing else is worth running)."""
    report = gradcheck_report(data.train.X, data.train.y, np.random.default_rng(0))
    worst = max(e for c in report["checks"] for e in c["max_rel_error"].values())
    log.info("gradient check: max relative error %.2e (%s)", worst,
             "pass" if report["passed"] else "FAIL")
    if not report["passed"]:
        raise DivergedError(f"gradient check failed (max relative error {worst:.2e} ≥ 1e-5)")
    return {"passed": True, "max_rel_error": worst}


def run_phase(campaign, name, data, storage, *, workers=1, storage_opts=None, progress=None):
    """Run (or resume) one phase of a campaign by name; returns (study, summary)."""
    run = run_context(campaign, data, storage, workers=workers, storage_opts=storage_opts,
                      progress=progress)
    phase = run.campaign.phase(name)
    study = phase.run(run)
    return study, phase_summary(phase, study)


def run_final(campaign, data, storage, *, pick=None, source=None, out=None, first_seed=0,
              workers=1, protect=(), force=False, progress=None, storage_opts=None):
    """The campaign's final run alone: pick = the given parameters (every searched one), else
    the campaign's best (its last phase with a result). Returns (metrics, pick, source)."""
    c = load_campaign(campaign) if isinstance(campaign, str) else campaign
    check_first_seed(c, first_seed)  # before the storage is opened
    run = run_context(campaign, data, storage, workers=workers, storage_opts=storage_opts,
                      progress=progress)
    if pick is None:
        pick, source = campaign_best(run)
    out = out or outputs_dir(run.campaign.name, storage) / "final"
    metrics = run.campaign.final.run(run, pick, source or {"study": None, "phase": "given",
                                                           "trial": None},
                                     out, first_seed=first_seed, protect=protect, force=force)
    return metrics, pick, source


def check_workers(workers):
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be a whole number ≥ 1 (got {workers!r})")


def campaign_best(run):
    """(pick, source): the searched parameters of the campaign's last phase with a result (a
    confirm phase's verdict, a search phase's best trial). InputError when none has one."""
    c = run.campaign
    names = set(optuna.get_all_study_names(run.storage))
    for phase in reversed(c.phases):
        name = phase.study_name(c.name)
        if name in names:
            best = phase.best(optuna.load_study(study_name=name, storage=run.storage))
            if best is not None:
                params, source = best
                return {k: params[k] for k in c.searched_names() if k in params}, source
    raise InputError(f"campaign {c.name!r} has no complete trial yet; run or resume its search "
                     "first, or give the parameters (e.g. --lam)")


def phase_summary(phase, study):
    """{"study", "space", "spec", "narrowed", "best"} of a phase's study (spec: what it ran, as
    text: search.report.phase_spec)."""
    rec = record.read(study)
    return {"study": study.study_name, "phase": phase.name, "space": rec.space,
            "spec": phase_spec(rec)[1],
            "narrowed": narrowing(study), "best": best_row(study)}


def result_of(run, metrics, out_dir, dashboard, check=None, seconds=None):
    """The CampaignResult of a finished campaign, read from the storage (every runner of one
    campaign reports the same)."""
    c = run.campaign
    studies = []
    for phase in c.phases:
        studies.append((phase, optuna.load_study(study_name=phase.study_name(c.name),
                                                 storage=run.storage)))
    verdict = next((record.verdict(s) for _, s in studies if record.verdict(s)), None)
    return CampaignResult(
        campaign=c.name, pick=metrics["params"], source=metrics["source"], verdict=verdict,
        studies=[s.study_name for _, s in studies]
        + [metrics.get("final_study", final_study_name(c.name))],
        phases=[phase_summary(p, s) for p, s in studies], final=metrics,
        outputs={"final": str(out_dir / "final"),
                 "dashboard": str(dashboard) if dashboard else None},
        gradcheck=check, seconds=None if seconds is None else round(seconds, 1))


def dashboard_maker(name, storage, storage_text):
    """A callable returning the campaign's search.plots.Dashboard, made (the studies' sections
    rendered) at its first call. run_campaign calls it first while the final run's last seed
    trains and a CPU is free: the plotting modules (~0.7 s to import, so imported only here) and
    the studies' figures then cost no wall time. A call that failed is made again (and raises)
    when the page is written, after the final run's results are saved."""
    @functools.cache
    def dashboard():
        from clr_lambda_search.search.plots import Dashboard

        return Dashboard(name, storage_text, campaign_studies(storage, name))
    return dashboard


def write_dashboard(dashboard, out_dir, protect=()):
    from clr_lambda_search.model.checkpoint import save_page

    path = Path(out_dir) / "dashboard.html"
    save_page(path, dashboard.html(read_final(Path(out_dir) / "final")), protect)
    log.info("dashboard -> %s", path)
    return path


# ---- retiring a phase ---------------------------------------------------------------------------

def retire(campaign, name, storage):
    """Retire phase `name` and every phase derived from it (and the final run): their studies
    are kept under new names (<study>.retired-<k>, marked retired) and deleted under their own,
    so that the next run derives them again; the final run's versions are marked retired under
    their names (the next final run is a new version). Returns the retired studies' names."""
    c = load_campaign(campaign) if isinstance(campaign, str) else campaign
    c.phase(name)
    names = set(optuna.get_all_study_names(storage))
    studies = [c.phase(p).study_name(c.name) for p in [name] + c.downstream(name)]
    return [retire_study(storage, s) for s in studies if s in names] + retire_final(storage, c.name)




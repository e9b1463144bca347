"""The final run: train the chosen parameters with the final protocol for several seeds, test once
each.

The run is the Optuna study <campaign>-final (no search ever reads it: test accuracy must not
leak into a pick). Its seeds are queued trials like any other phase's, claimed once each by
whichever runner's worker takes them (a cluster finishes them faster); a trial's value is its
seed's test accuracy, its user attrs the seed's metrics and history, its artifacts the seed's
parameters (and, for the first seed, the figures). The results folder is written from the study
and the artifacts by the runner that sees the last seed finish, and by any runner whose folder
does not show that run yet.

A final record is replaced only by a complete new one. A run with another pick (--force-final) or
other settings does not touch the current record: it trains as a new version of the final study
(<campaign>-final.v2, .v3, …) beside it. The campaign's final run is its newest complete version
that is not retired (current_final), so the new one becomes it the moment its last seed finishes;
the versions before it are then marked retired, kept with their artifacts. A new run that fails
at any point leaves the previous final study, its artifacts and the results folder as they were.
"""
import dataclasses
import itertools
import logging
import re
import shutil
import tempfile
import time
import typing
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from clr_lambda_search.model.checkpoint import load_json, load_params, save_json, save_params, save_run
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.outputs import publish_dir
from clr_lambda_search.model.schedule import step_size
from clr_lambda_search.model.train import TrainConfig, evaluate, evaluate_ensemble, fit
from clr_lambda_search.search import record
from clr_lambda_search.search.lock import storage_lock
from clr_lambda_search.search.phases import Phase, open_study, pinned, queue, run_phase_workers, same_config
from clr_lambda_search.search.space import format_params
from clr_lambda_search.search.study import study_name
from clr_lambda_search.search.workers import QueuedTarget

log = logging.getLogger(__name__)


N_S_RULE = r"\s*[1-9]\d*\s+epochs?\s*"  # final.n_s = "K epochs"


VERSION = ".v"  # <campaign>-final.v2: a final run that replaces another trains beside it

MAX_FINAL_SEEDS = 100  # as a confirm phase's seeds: each trains the final protocol, one process


def final_study_name(campaign):
    return study_name(campaign, "final")


@dataclasses.dataclass(frozen=True)
class FinalRun(Phase):
    """The final run: seeds, the n_s rule ("K epochs") or value, and TrainConfig values that win
    over the best parameters."""

    name: str = "final"
    seeds: int = 3
    n_s: object = "2 epochs"
    kind: typing.ClassVar[str] = "final"

    @property
    def trials(self):
        return self.seeds

    def training_config(self, campaign, best, n_train):
        """The final TrainConfig: the shared config, then the best parameters, then the final
        section's own values; an n_s rule ("2 epochs") is evaluated last, with the n_batch in
        force."""
        config = pinned(TrainConfig(**{**dict(campaign.config), **best, **dict(self.config)}))
        return dataclasses.replace(config, n_s=final_n_s(self.n_s, n_train, config.n_batch))

    def validate(self, campaign, fail):
        """Check the final section against its campaign; fail(key, message) raises."""
        if not (isinstance(self.seeds, int) and not isinstance(self.seeds, bool)
                and 1 <= self.seeds <= MAX_FINAL_SEEDS):
            fail("final.seeds", f"train 1..{MAX_FINAL_SEEDS} seeds (got {self.seeds}; e.g. "
                 "seeds = 3)")
        n_s = self.n_s
        if not ((isinstance(n_s, int) and not isinstance(n_s, bool) and n_s > 0) or (
                isinstance(n_s, str) and re.fullmatch(N_S_RULE, n_s))):
            fail("final.n_s", f"{n_s!r} is neither a number of updates > 0 nor a rule such as "
                 "\"2 epochs\"")
        try:
            self.training_config(campaign, {}, 49_000)
        except InputError as e:
            fail("final", str(e))

    def to_dict(self):
        return {"seeds": self.seeds, "n_s": self.n_s, "config": dict(self.config)}

    # ---- running ----------------------------------------------------------------------------

    def run(self, run, pick, source, out, first_seed=0, protect=(), force=False,
            on_cpu_free=None):
        """Train pick (the searched parameters' values; source: where they came from) on the
        campaign's seeds, each once across runners, then publish the results folder `out`
        (atomically; model.outputs.publish_dir for `protect`). Returns the metrics."""
        config = self.training_config(run.campaign, pick, len(run.data.train.y))
        pick = {k: getattr(config, k) for k in pick}  # the final section's values win
        seeds = [first_seed + k for k in range(self.seeds)]
        study = self.open(run, pick, source, config, seeds, force, out)
        log.info("%s: %s from %s, %d seeds × %d updates", study.study_name, pick,
                 source.get("study") or "the flags", len(seeds), config.total_steps)
        queue(run, study, [(seed_params(pick, s), {record.FINAL_SEED: s}) for s in seeds])
        checkpoints = Path(f"{out}.checkpoints")  # a seed killed mid-run resumes from here
        objective = FinalObjective(run.data, config, pick, seeds, artifact_dir(out),
                                   checkpoints)
        # a diverged seed has no test accuracy: it stops the run (a confirm trial's scores 0)
        goal = QueuedTarget([("final", s) for s in seeds], count_diverged=False)
        run_phase_workers(run, study, objective, goal,
                          len(seeds), count=_seeds_done, share_cpus=True,
                          on_cpu_free=on_cpu_free)
        shutil.rmtree(checkpoints, ignore_errors=True)
        retire_final(run.storage, run.campaign.name, before=study.study_name)
        return publish(run, study, out, protect)

    def open(self, run, pick, source, config, seeds, force, out):
        """The final study to train for this pick and config: the newest version when it is of
        them (resumed), else a new version beside the current record (search.final's module
        docstring). A current record of another pick is refused unless force."""
        wanted = record.StudyRecord(
            campaign=run.campaign.name, phase="final", kind=self.kind,
            index=len(run.campaign.phases), config={**dataclasses.asdict(config), "seed": None},
            pick=pick, seeds=seeds, n_trials=len(seeds), digest=run.campaign.digest(),
            fingerprint=run.fingerprint, precision=config.precision, source=source)
        campaign = run.campaign.name
        with storage_lock(run.storage, final_study_name(campaign)):
            versions = final_versions(run.storage, campaign)
            newest = versions[-1] if versions else None
            if newest and _resumes(newest, wanted, out):
                return open_study(run, newest.study_name, wanted, metric="test_acc")
            current = current_final(run.storage, campaign, versions)
            old = record.read(current) if current else None
            if old and old.pick is not None and old.pick != pick and not force:
                raise InputError(
                    f"campaign {campaign!r} has a final run of {old.pick}, and its pick is "
                    f"now {pick}; use a new --campaign to keep both, or --force-final to "
                    "replace that final run (kept as a retired study)")
            if newest and newest is not current and not record.read(newest).retired:
                # a replacement of other settings that never finished: kept, out of the way
                record.update(newest, retired=True)
            name = version_name(campaign, len(versions) + 1)
            if current:
                log.warning("%s: a final run of %s with other settings; it trains as %s, and "
                            "%s stays the campaign's final run until every seed of the new one "
                            "has finished", current.study_name, old.pick, name,
                            current.study_name)
            return open_study(run, name, wanted, metric="test_acc")


def version_name(campaign, k):
    """The study of version k of a campaign's final run: <campaign>-final, then -final.v2, …"""
    return final_study_name(campaign) + ("" if k == 1 else f"{VERSION}{k}")


def final_versions(storage, campaign):
    """The campaign's final studies (the versions of its final run), oldest first."""
    names = set(optuna.get_all_study_names(storage))
    versions = []
    for k in itertools.count(1):
        if version_name(campaign, k) not in names:
            return versions
        versions.append(optuna.load_study(study_name=version_name(campaign, k), storage=storage))


def current_final(storage, campaign, versions=None):
    """The campaign's final run of record: its newest version that is complete (every seed
    finished) and not retired; None when it has none. A newer version still training, or one
    that failed, does not replace it."""
    versions = final_versions(storage, campaign) if versions is None else versions
    return next((s for s in reversed(versions) if not record.read(s).retired
                 and is_complete(s)), None)


def is_complete(study):
    """Whether every seed of a final study has finished (a release before the schema recorded
    no seeds: whether it has a finished one)."""
    done = {t.user_attrs.get(record.FINAL_SEED)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    seeds = record.read(study).seeds
    return set(seeds) <= done if seeds else bool(done)


def retire_final(storage, campaign, before=None):
    """Mark the versions of the campaign's final run retired (kept under their names, with their
    artifacts; the next final run is a new version): every one, or those before the study named
    `before` (a complete version that replaces them). Returns their names."""
    names = []
    for study in final_versions(storage, campaign):
        if study.study_name == before:
            break
        if not record.read(study).retired:
            record.update(study, retired=True)
            names.append(study.study_name)
            log.info("final study %s retired%s", study.study_name,
                     f" (replaced by {before})" if before else "")
    return names


def _resumes(study, wanted, out):
    """Whether final study `study` is the one to train for `wanted` (a StudyRecord): not
    retired, of the same pick, seeds, data, precision and config, and (a release before the
    schema, whose seeds' histories were files only) shown by the results folder `out`."""
    old = record.read(study)
    if old.retired:
        return False
    if any(getattr(old, f) not in (None, getattr(wanted, f))
           for f in ("pick", "seeds", "fingerprint", "precision")):
        return False
    if not same_config(old.config, wanted.config):
        return False
    if old.version < 2:
        shown = read_final(out, strict=False)
        return bool(shown and shown["metrics"].get("params") == wanted.pick)
    return True


def seed_params(pick, seed):
    """The params a final trial is queued with: the pick's values and its training seed."""
    return {SEED_PARAM: seed, **pick}  # (a pick that holds a seed keeps it)


SEED_PARAM = "seed"  # a final trial's param: the seed it trains (also its user attr, the key)


def _seeds_done(trials):
    return sum(t.state == TrialState.COMPLETE and record.FINAL_SEED in t.user_attrs
               for t in trials)


def final_n_s(rule, n_train, n_batch):
    if isinstance(rule, int):
        return rule
    k = int(re.fullmatch(r"\s*(\d+)\s+epochs?\s*", rule).group(1))
    return step_size(n_train, n_batch, k)


class FinalObjective:
    """Callable(trial) -> the test accuracy of the seed the trial was queued with; the seed's
    metrics and history go to its user attrs, its parameters (and history) to its artifacts.

    The trial's params are what it trains: the pick (each a one-choice categorical: the final
    run searches nothing) and its `seed` (a category of the run's seeds), so Optuna's views of the
    final study show them. The training runs inside the trial (a worker claims the queued
    trial, then calls this): the trial's duration is its seed's training and test."""

    def __init__(self, data, config, pick, seeds, artifacts, checkpoints=None):
        self.data = data
        self.base_config = config
        self.pick = pick
        self.seeds = list(seeds)
        self.artifacts = Path(artifacts)
        self.checkpoints = checkpoints  # a folder of the seeds' training states, or None

    def __call__(self, trial):
        seed = trial.user_attrs[record.FINAL_SEED]
        for name, value in self.pick.items():  # recorded as the trial's params
            trial.suggest_categorical(name, [value])
        if SEED_PARAM not in self.pick:
            # the run's seeds as categories (one distribution for every trial of a study); the
            # trial was queued with its seed as a fixed param
            trial.suggest_categorical(SEED_PARAM, self.seeds)
        state = Path(self.checkpoints) / f"seed{seed}.npz" if self.checkpoints else None
        with record.failure_said(trial):
            r = train_seed(self.data, dataclasses.replace(self.base_config, seed=seed),
                           train_curve=seed == self.seeds[0], checkpoint=state)
        for key, value in {"val_acc": r["val"]["acc"], "val_loss": r["val"]["loss"],
                           "train_acc": r["train"]["acc"], "test_loss": r["test"]["loss"],
                           "test_acc_ensemble": r["test_ensemble"]["acc"],
                           "steps": self.base_config.total_steps, "seconds": r["seconds"],
                           "history": r["history"]}.items():
            trial.set_user_attr(key, value)
        self._upload(trial, seed, r)
        if state:
            state.unlink(missing_ok=True)  # the seed's results are in the storage
        return r["test"]["acc"]

    def _upload(self, trial, seed, r):
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        self.artifacts.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(self.artifacts))
        with tempfile.TemporaryDirectory() as tmp:
            files = [Path(tmp) / f"params_seed{seed}.npz", Path(tmp) / f"history_seed{seed}.json"]
            save_params(files[0], r["params"])
            save_json(files[1], r["history"])
            for file in files:
                upload_artifact(artifact_store=store, file_path=str(file), study_or_trial=trial)


def train_seed(data, config, train_curve=True, on_eval=None, checkpoint=None):
    """Train one seed of the final protocol and test it once (and its snapshot ensemble of the
    cycle ends): {seed, params, history, train, val, test, test_ensemble, seconds}. Only the
    first seed measures the train subset at every evaluation point (its curves are drawn); the
    others at the end only (on 10,000 images that saves a fifth of their time). checkpoint: a
    file its state is saved to at every cycle end and resumed from (model.train.fit)."""
    start = time.perf_counter()
    params, history, snapshots = fit(data, config, on_eval=on_eval, train_curve=train_curve,
                                     snapshots=True, checkpoint=checkpoint)
    test = evaluate(params, data.test.X, data.test.y, config.lam)
    ensemble = evaluate_ensemble(snapshots, data.test.X, data.test.y)
    log.info("final seed %d: val acc %.4f, test acc %.4f (snapshot ensemble of %d: %.4f)",
             config.seed, history[-1]["val"]["acc"], test["acc"], len(snapshots), ensemble["acc"])
    return {"seed": config.seed, "params": params, "history": history,
            "train": history[-1]["train"], "val": history[-1]["val"], "test": test,
            "test_ensemble": ensemble, "seconds": round(time.perf_counter() - start, 2)}


# ---- the results folder -------------------------------------------------------------------------

def final_metrics(runs, params, source, trials=None, study=None, precision=None):
    """metrics.json: the chosen parameters and where they came from, per-seed accuracies, test
    mean ± std, and the test accuracy of each seed's snapshot ensemble (one member per cycle)
    and their mean; the final study and its trials it was written from, and the precision its
    products were computed in (the study's, resolved: fp32 or bf16). (config.json holds the
    whole TrainConfig that was trained.)"""
    test = [r["test"]["acc"] for r in runs]
    ensemble = [r["test_ensemble"]["acc"] for r in runs]
    ensemble_mean = None if None in ensemble else float(np.mean(ensemble))
    return {
        "params": params, "source": source,
        "seeds": [{"seed": r["seed"], "train_acc": r["train"]["acc"], "val_acc": r["val"]["acc"],
                   "test_acc": r["test"]["acc"], "test_loss": r["test"]["loss"],
                   "test_acc_ensemble": r["test_ensemble"]["acc"],
                   "seconds": r["seconds"]} for r in runs],
        "val_acc_mean": float(np.mean([r["val"]["acc"] for r in runs])),
        "test_acc_mean": float(np.mean(test)), "test_acc_std": float(np.std(test)),
        "test_acc_ensemble_mean": ensemble_mean,
        "seconds": round(sum(r["seconds"] for r in runs), 2),
        **({"trials": trials} if trials is not None else {}),
        **({"final_study": study} if study is not None else {}),
        **({"precision": precision} if precision is not None else {}),
    }


def publish(run, study, out, protect=()):
    """Write the results folder `out` from the final study (once: a folder that already shows
    these trials is kept) and attach its figures to the first seed's trial; returns the
    metrics."""
    with storage_lock(run.storage, f"{study.study_name}.publish"):
        rec = record.read(study)
        trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                        key=lambda t: rec.seeds.index(t.user_attrs[record.FINAL_SEED]))
        numbers = [t.number for t in trials]
        shown = read_final(out, strict=False)
        if shown and shown["metrics"].get("trials") == numbers \
                and shown["metrics"].get("params") == rec.pick \
                and shown["metrics"].get("final_study", final_study_name(rec.campaign)) == study.study_name:
            # (a folder of a release before versions was written from <campaign>-final)
            return shown["metrics"]
        store = _store(artifact_dir(out))
        runs = [_run_of(t, store, run.storage) for t in trials]
        metrics = final_metrics(runs, rec.pick, rec.source, numbers, study.study_name,
                                rec.precision)
        config = TrainConfig(**{k: v for k, v in rec.config.items() if k != "seed"})
        tagged = [(f"_seed{r['seed']}", r["params"], r["history"]) for r in runs]
        config = dataclasses.replace(config, seed=rec.seeds[0])
        publish_dir(out, lambda folder: save_run(folder, config, metrics, tagged, {
            "data": run.data.source, "seeds": rec.seeds}, named=format_params(rec.pick)), protect)
        _attach_figures(study, store, out)
        return metrics


def _store(folder):
    from optuna.artifacts import FileSystemArtifactStore

    Path(folder).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def _run_of(t, store, storage):
    """A seed's run, rebuilt from its trial (and its parameters from the artifact store: None
    when this runner cannot reach it, e.g. another machine's local folder)."""
    a = t.user_attrs
    # a final run of 03d5f40 kept the history as an artifact only, and no snapshot ensemble
    history = a.get("history") or _artifact(t, store, storage, "history_seed", load_json)
    return {"seed": a[record.FINAL_SEED], "params": _artifact(t, store, storage, "params_seed",
                                                              load_params),
            "history": history, "train": history[-1]["train"], "val": history[-1]["val"],
            "test": {"acc": t.value, "loss": a["test_loss"]},
            "test_ensemble": {"acc": a.get("test_acc_ensemble")}, "seconds": a["seconds"]}


def _artifact(t, store, storage, prefix, load):
    """load(the trial's artifact whose file name starts with prefix), or None when it has none
    or this runner cannot reach it (another machine's local store: the folder goes without)."""
    from optuna.artifacts import download_artifact, get_all_artifact_meta

    for meta in get_all_artifact_meta(t, storage=storage):
        if meta.filename.startswith(prefix):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / meta.filename
                try:
                    download_artifact(artifact_store=store, file_path=str(path),
                                      artifact_id=meta.artifact_id)
                except Exception as e:
                    log.warning("%s of final trial %d not reachable here (%s)", meta.filename,
                                t.number, e)
                    return None
                return load(path)
    return None


def _attach_figures(study, store, out):
    """The results folder's figures (the first seed's curves) as artifacts of the final study,
    once (optuna-dashboard shows them; a finished trial takes no artifact)."""
    from optuna.artifacts import get_all_artifact_meta, upload_artifact

    have = {m.filename for m in get_all_artifact_meta(study)}
    for path in sorted(p for ext in ("png", "svg") for p in Path(out).glob(f"*.{ext}")):
        if path.name not in have:
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)


def artifact_dir(out):
    """Where the final run's artifacts go: beside its results folder (studies/<campaign>/)."""
    return Path(out).parent / "artifacts"


def read_final(folder, strict=True):
    """{"metrics", "config", "history" (of the first seed), "histories" (every seed's, by seed)}
    of a final results folder, or None when it has none. Its files are untrusted: one that is
    corrupt, of the wrong type or missing is an InputError naming it (strict=False: None, for a
    run about to rewrite the folder)."""
    folder = Path(folder)
    if not (folder / "metrics.json").exists():
        return None
    try:
        metrics = load_json(folder / "metrics.json", dict)
        seeds = metrics.get("seeds")
        if not (isinstance(seeds, list) and seeds and all(
                isinstance(s, dict) and isinstance(s.get("seed"), int) for s in seeds)):
            raise InputError(f"{folder / 'metrics.json'} lists no seeds of a final run; "
                             "re-run scripts/final.py")
        first = seeds[0]["seed"]  # the curves drawn; another seed's history may be absent
        histories = {s["seed"]: load_json(folder / f"history_seed{s['seed']}.json", list)
                     for s in seeds if s["seed"] == first
                     or (folder / f"history_seed{s['seed']}.json").exists()}
        return {"metrics": metrics, "config": load_json(folder / "config.json", dict),
                "folder": str(folder),
                "history": histories[first], "histories": histories}
    except InputError:
        if strict:
            raise
        return None

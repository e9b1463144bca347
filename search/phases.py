"""The phase types of a campaign: a search phase and a confirm phase (the final run is
search.final.FinalRun). Each knows how to validate, run (or resume) and summarise itself; a new
phase kind is one new type (and its parser in search.campaign._PARSERS). Nothing outside these
types branches on a phase's kind: callers use their methods, and read studies through search.record.

Runners of one campaign coordinate through the storage alone: a phase's study is created and its
space derived under the study's storage lock (search.lock), once; a later runner that finds a
phase finished skips it; a narrowed or confirm phase whose source changed after it was derived
refuses to go on (StalePhase) until it is retired (search.core.retire).
"""
import dataclasses
import json
import logging
import typing
import warnings

import numpy as np
import optuna

from clr_lambda_search.model.errors import ConfigError, InputError, WorkersFailed
from clr_lambda_search.model.precision import resolve_precision
from clr_lambda_search.model.train import SEED_LIMIT, TrainConfig
from clr_lambda_search.search import budget, record
from clr_lambda_search.search.confirm import SEED_BASE, race, sentence, verdict
from clr_lambda_search.search.lock import storage_lock
from clr_lambda_search.search.objective import Objective
from clr_lambda_search.search.samplers import (exercise, make_pruner, make_sampler, pruner_label,
                                               sampler_label)
from clr_lambda_search.search.space import (format_params, is_typed, narrow, space_from_dict,
                                           space_to_dict, suggest)
from clr_lambda_search.search.study import finished_trials, load_study, study_name
from clr_lambda_search.search.workers import QueuedTarget, TrialTarget, n_done, run_workers

log = logging.getLogger(__name__)

MAX_MARGIN = 100  # decades (log) or × the range (linear): more widens nothing, the range clips it
METRIC = "val_acc"  # the objective's name in Optuna's tools (our own figures: validation accuracy)
MAX_TRIALS = 100_000  # trials of one phase: more is a typo (each is a row of the storage and a run)
MAX_REPEATS = 1000    # seeds per trial: each trial trains them all, and lists them in the study


class StalePhase(InputError):
    """A phase was derived from an earlier phase whose best trials have changed since."""


@dataclasses.dataclass
class PhaseRun:
    """What a phase runs with: the campaign, the storage, the data and the workers."""

    campaign: object
    storage: object
    data: object = None
    workers: int = 1
    storage_opts: dict = None
    progress: object = None      # callable(study_name, done, total, unit) or None
    fingerprint: str = None      # of the data (model.dataset.fingerprint)

    def report(self, name, done, total, unit="trial"):
        if self.progress:
            self.progress(name, done, total, unit)


@dataclasses.dataclass(frozen=True)
class Phase:
    """What every phase type has: a name and TrainConfig overrides."""

    name: str
    config: tuple = ()          # (field, value) TrainConfig overrides of this phase
    kind: typing.ClassVar[str] = None

    def study_name(self, campaign_name):
        return study_name(campaign_name, self.name)

    def upstream(self):
        """The names of the earlier phases this one is derived from."""
        return ()


@dataclasses.dataclass(frozen=True)
class SearchPhase(Phase):
    """An Optuna search of its space (or of a range narrowed from an earlier phase)."""

    n_trials: int = 10          # COMPLETE trials the phase ends with (values tried, for a grid)
    space: tuple = ()           # search.space parameters; () for a narrowed phase
    sampler: object = "random"  # a name, {name, **kwargs}, or an optuna sampler object
    pruner: object = "median"   # likewise for optuna pruners
    repeats: int = 1            # training seeds per trial (the objective is their mean)
    narrow: object = None       # {"from": phase, "top_k": k, "margin": m} or None
    grid: object = None         # {param: [values]} for the grid sampler, or None
    max_pruned: int = None      # stop once this many trials were pruned (default 5 × n_trials)
    max_failed: int = None      # stop once this many failed (default max(5, n_trials))
    study: str = None           # the study's name (default <campaign>-<name>)
    budget: object = None       # a search.budget.Budget: ends the phase once spent, if sooner
    start: tuple = ()           # configurations ({param: value}) queued first, once
    kind: typing.ClassVar[str] = "search"
    confirmable: typing.ClassVar[bool] = True  # a confirm phase may race its best trials
    settings: typing.ClassVar[tuple] = ("n_trials", "repeats", "sampler", "pruner", "max_pruned",
                                        "max_failed", "budget", "start", "narrow.top_k",
                                        "narrow.margin")

    def study_name(self, campaign_name):
        return self.study or super().study_name(campaign_name)

    def upstream(self):
        return (self.narrow["from"],) if self.narrow else ()

    def base_space(self, campaign):
        """The space the phase starts from: its own, or that of the phase it narrows."""
        return campaign.phase(self.narrow["from"]).base_space(campaign) if self.narrow \
            else self.space

    @property
    def trials(self):
        return self.n_trials

    def validate(self, campaign, fail):
        """Check the phase against its campaign; fail(key, message) raises."""
        if not (1 <= self.n_trials <= MAX_TRIALS and 1 <= self.repeats <= MAX_REPEATS):
            fail("", f"n_trials must lie in 1..{MAX_TRIALS} and repeats in 1..{MAX_REPEATS} (got "
                 f"{self.n_trials}, {self.repeats})")
        for cap in ("max_pruned", "max_failed"):
            if getattr(self, cap) is not None and getattr(self, cap) < 1:
                fail(cap, f"must be ≥ 1 (got {getattr(self, cap)})")
        if self.narrow:
            top_k, margin = self.narrow["top_k"], self.narrow["margin"]
            if not (1 <= top_k <= MAX_TRIALS and isinstance(margin, (int, float))
                    and not isinstance(margin, bool) and 0 < margin <= MAX_MARGIN):
                fail("narrow", f"top_k must lie in 1..{MAX_TRIALS} and margin in (0, {MAX_MARGIN}] "
                     "(e.g. {from = \"coarse\", top_k = 3, margin = 0.25})")
        config = campaign.phase_config(self)
        if config.seed + self.repeats > SEED_LIMIT:  # every trial trains seeds seed … + repeats − 1
            fail("repeats", f"the training seeds {config.seed}..{config.seed + self.repeats - 1} "
                 f"pass {SEED_LIMIT - 1}; lower config.seed or repeats")
        fixed = {**dict(campaign.search), **dict(self.config)}
        for p in _params(self.base_space(campaign)):
            if p.name in fixed:
                fail(f"params.{p.name}", "both searched and fixed (in [search] or the phase's "
                     "config); drop one")
        _check(lambda: campaign.phase_configs(self), "params", fail)
        sampler = _check(lambda: self.make_sampler(campaign), "sampler", fail)
        if _is_grid(self.sampler) and not self.grid:
            fail("sampler", "the grid sampler needs values = [...] for every parameter")
        pruner = _check(lambda: make_pruner(self.pruner, config), "pruner", fail)
        for i, params in enumerate(self.start):
            _check(lambda: check_start(params, self.base_space(campaign)), f"start[{i}]", fail)
        # a Python user's own sampler or pruner object is not exercised: it keeps state (the
        # study it samples) and its methods may watch its calls; the named ones are made anew
        sampler = sampler if not isinstance(self.sampler, optuna.samplers.BaseSampler) else None
        pruner = pruner if not isinstance(self.pruner, optuna.pruners.BasePruner) else None
        if sampler is not None or pruner is not None:
            key = _exercise_key(self, campaign, config, sampler is not None, pruner is not None)
            if key not in _EXERCISED:
                try:
                    exercise(sampler or optuna.samplers.RandomSampler(seed=0),
                             pruner or optuna.pruners.NopPruner(), self.base_space(campaign),
                             config, self.n_trials, suggest)
                except ConfigError as e:
                    fail(e.key, str(e))
                _EXERCISED.add(key)

    def to_dict(self):
        return {"name": self.name, "kind": self.kind, "n_trials": self.n_trials,
                "space": space_to_dict(self.space), "sampler": sampler_label(self.sampler),
                "pruner": pruner_label(self.pruner), "repeats": self.repeats,
                "config": dict(self.config), "narrow": self.narrow, "grid": self.grid,
                "max_pruned": self.max_pruned, "max_failed": self.max_failed,
                # only when set: the digests of the campaigns written before them stay as they were
                **({"budget": str(self.budget)} if self.budget is not None else {}),
                **({"start": [dict(s) for s in self.start]} if self.start else {})}

    # ---- running ----------------------------------------------------------------------------

    def open(self, run):
        """The phase's study, created with its record (its space derived once, under the
        study's lock) or resumed after checking the record matches."""
        name = self.study_name(run.campaign.name)
        check_foreign(run.storage, name)  # refused before the lock writes to the storage
        with storage_lock(run.storage, name):
            space, narrowed = self._space(run, name)
            study = open_study(run, name, self._record(run, space, narrowed))
            if self.start and not record.read(study).start_queued:
                for params in self.start:  # queued first, once across runners
                    study.enqueue_trial(dict(params), skip_if_exists=True)
                record.update(study, start_queued=True)
        self._check_fresh(run, study)
        return study

    def run(self, run):
        """Run (or resume) the phase until its study holds n_trials done trials; the study."""
        study = self.open(run)
        wanted = {"n_trials": self.n_trials,
                  "budget": None if self.budget is None else str(self.budget)}
        recorded = record.read(study)
        changed = {k: v for k, v in wanted.items() if getattr(recorded, k) != v}
        if changed:  # resumed to another target
            record.update(study, **changed)
        rec = record.read(study)
        space = space_from_dict(rec.space) if rec.space is not None else self.space
        config = pinned(run.campaign.phase_config(self))
        goal = TrialTarget(self.n_trials, count_diverged=self.grid is not None,
                           max_pruned=self.max_pruned, max_failed=self.max_failed,
                           pruner=pruner_label(self.pruner), budget=self.budget,
                           trial_updates=self.repeats * config.total_steps)
        log.info("%s: %s in %s", study.study_name, self._target_text(), _space_text(rec.space))
        if self.budget is None:
            total, count = self.n_trials, lambda trials: sum(goal.done([t]) for t in trials)
        else:  # progress in the budget's unit
            total = int(self.budget.amount)
            count = lambda trials: min(total, int(budget.spent(trials, self.budget.unit)))  # noqa: E731
        run_phase_workers(run, study, Objective(run.data, config, space, repeats=self.repeats),
                          goal, total, sampler=lambda: self.make_sampler(run.campaign),
                          pruner=make_pruner(self.pruner, config), count=count)
        return study

    def _target_text(self):
        if self.budget is None:
            return f"{self.n_trials} trials"
        return f"a budget of {self.budget} (at most {self.n_trials} trials)"

    def make_sampler(self, campaign):
        """The phase's sampler, its draws seeded from (study seed, phase index, trial number): no
        phase of the campaign replays another's (search.samplers)."""
        return make_sampler(self.sampler, campaign.seed, self.grid, phase=campaign.index(self.name))

    def _space(self, run, name):
        """(space, narrowed): the recorded one of a resumed study, else the phase's own or the
        one derived from the phase it narrows (which must be finished)."""
        if not self.narrow:
            return self.space, None  # its own (open_study refuses one that differs)
        if name in optuna.get_all_study_names(run.storage):
            recorded = record.read(optuna.load_study(study_name=name, storage=run.storage))
            if recorded.space is not None:
                return space_from_dict(recorded.space), recorded.narrowed
        return derive(run.storage, run.campaign, self)

    def _record(self, run, space, narrowed):
        config = dataclasses.asdict(pinned(run.campaign.phase_config(self)))
        for p in _params(space):
            config.pop(p.name)
        c = run.campaign
        return record.StudyRecord(
            campaign=c.name, phase=self.name, kind=self.kind, index=c.index(self.name),
            config=config, space=space_to_dict(space), sampler=sampler_label(self.sampler),
            grid=self.grid, pruner=pruner_label(self.pruner), repeats=self.repeats,
            seed=self.make_sampler(c).study_seed,
            n_trials=self.n_trials, digest=c.digest(), narrowed=narrowed,
            budget=None if self.budget is None else str(self.budget),
            fingerprint=run.fingerprint, precision=config["precision"])

    def _check_fresh(self, run, study):
        rec = record.read(study)
        if not (self.narrow and rec.narrowed and rec.narrowed.get("from_trials") is not None):
            return
        source = run.campaign.phase(self.narrow["from"])
        now = [t.number for t in finished_trials(load_study(
            run.storage, source.study_name(run.campaign.name)))[:self.narrow["top_k"]]]
        if now != rec.narrowed["from_trials"]:
            raise StalePhase(
                f"phase {self.name} was narrowed from trials {rec.narrowed['from_trials']} of "
                f"phase {source.name}, whose best {self.narrow['top_k']} are now {now} (it "
                f"changed since); retire {self.name} to derive it again (scripts/search.py "
                f"retire {self.name} --campaign {run.campaign.name}), or use a new --campaign")

    # ---- reading ----------------------------------------------------------------------------

    def best(self, study):
        """(params, source) of the study's best complete trial, or None."""
        done = finished_trials(study)
        if not done:
            return None
        return dict(done[0].params), {"study": study.study_name, "phase": self.name,
                                      "trial": done[0].number, "val_acc": done[0].value}


@dataclasses.dataclass(frozen=True)
class ConfirmPhase(Phase):
    """The best top_k configurations of earlier search phases, raced on at most `seeds` paired
    seeds (search.confirm: losers dropped early, stopped once the pick is decided); every
    (candidate, seed) is one queued trial, trained once."""

    sources: tuple = ()         # the search phases it confirms
    top_k: int = 3
    seeds: int = 5
    kind: typing.ClassVar[str] = "confirm"
    confirmable: typing.ClassVar[bool] = False
    settings: typing.ClassVar[tuple] = ("top_k", "seeds")
    sampler: typing.ClassVar[str] = "random"   # every trial is queued with its parameters
    pruner: typing.ClassVar[str] = "none"      # a pruned trial would leave its pair without a value
    repeats: typing.ClassVar[int] = 1

    @property
    def trials(self):
        return self.top_k * self.seeds

    n_trials = trials

    def upstream(self):
        return tuple(self.sources)

    def base_space(self, campaign):
        return campaign.phase(self.sources[0]).base_space(campaign)

    def validate(self, campaign, fail):
        if self.top_k < 2 or not 2 <= self.seeds <= 100:
            fail("", "top_k must be ≥ 2 (configurations to compare) and seeds in 2..100 (got "
                 f"top_k = {self.top_k}, seeds = {self.seeds})")
        _check(lambda: campaign.phase_config(self), "config", fail)

    def to_dict(self):
        return {"name": self.name, "kind": self.kind, "from": list(self.sources),
                "top_k": self.top_k, "seeds": self.seeds, "config": dict(self.config)}

    # ---- running ----------------------------------------------------------------------------

    def open(self, run):
        """The confirm study, with its candidates and seeds recorded once (under its lock)."""
        name = self.study_name(run.campaign.name)
        check_foreign(run.storage, name)  # refused before the lock writes to the storage
        with storage_lock(run.storage, name):
            study = open_study(run, name, self._record(run))
            if record.read(study).candidates is None:
                cands = candidates(run, self)
                record.update(study, candidates=cands,
                              seeds=[SEED_BASE + r for r in range(self.seeds)],
                              derived_from=[[c["study"], c["trial"]] for c in cands])
        self._check_fresh(run, study)
        return study

    def run(self, run):
        """Race the candidates (resuming what is done); records the verdict; the study."""
        study = self.open(run)
        rec = record.read(study)
        try:
            decided = record.verdict(study) is not None
        except InputError:
            decided = False  # a malformed verdict (read back, untrusted) is raced anew
        if decided:
            # decided: a resumed campaign keeps its pick, even one raced by an earlier rule
            return study
        cands, seeds = rec.candidates, rec.seeds
        config = pinned(run.campaign.phase_config(self))
        objective = Objective(run.data, config, self.base_space(run.campaign))
        log.info("%s: the best %d configurations of %s on %d paired seeds", study.study_name,
                 len(cands), ", ".join(self.sources), len(seeds))

        def train(alive, block_seeds):
            keys = [("confirm", c, s) for s in block_seeds for c in alive]
            queue(run, study, [(cands[c]["params"], {record.CANDIDATE: c,
                                                     record.CONFIRM_SEED: s})
                               for _, c, s in keys])
            run_phase_workers(run, study, objective, QueuedTarget(keys), self.trials,
                              count=lambda trials: len(round_values(trials)))

        def evaluate_round(alive, seed):
            train(alive, [seed])  # nothing to do when the block was trained (prefetch)
            have = round_values(study.get_trials(deepcopy=False))
            return [have[(c, seed)] for c in alive]

        state = race(len(cands), seeds, evaluate_round, prefetch=train)
        v = verdict(state)
        v.update(sentence=sentence(v, lambda c: format_params(cands[c]["params"])),
                 params=cands[v["pick"]]["params"],
                 scores={str(c): s for c, s in state.scores.items()},
                 dropped={str(c): r for c, r in state.dropped.items()},
                 means={str(c): state.mean(c) for c in state.scores if state.scores[c]})
        record.update(study, verdict=v)
        log.info("%s: %s", study.study_name, v["sentence"])
        return study

    def _record(self, run):
        c = run.campaign
        config = dataclasses.asdict(pinned(c.phase_config(self)))
        space = self.base_space(c)
        for p in space:
            config.pop(p.name)
        return record.StudyRecord(
            campaign=c.name, phase=self.name, kind=self.kind, index=c.index(self.name),
            config=config, space=space_to_dict(space), sampler=self.sampler, pruner=self.pruner,
            repeats=1, seed=c.seed, n_trials=self.trials, digest=c.digest(),
            fingerprint=run.fingerprint, precision=config["precision"])

    def _check_fresh(self, run, study):
        rec = record.read(study)
        if not rec.derived_from:
            return  # recorded by a release that did not record them: nothing to compare
        now = [[c["study"], c["trial"]] for c in candidates(run, self)]
        if now != rec.derived_from:
            raise StalePhase(
                f"phase {self.name} confirms trials {_refs(rec.derived_from)}, but the best "
                f"{self.top_k} of {', '.join(self.sources)} are now {_refs(now)} (they changed "
                f"since); retire {self.name} to derive it again (scripts/search.py retire "
                f"{self.name} --campaign {run.campaign.name}), or use a new --campaign")

    # ---- reading ----------------------------------------------------------------------------

    def best(self, study):
        """(params, source) of the verdict's pick, or None before the race ended."""
        v = record.verdict(study)
        if v is None:
            return None
        return dict(v["params"]), {"study": study.study_name, "phase": self.name,
                                   "trial": None, "val_acc": v["means"].get(
                                       str(v["pick"]), float(np.mean(v["scores"][str(v["pick"])])))}


def check_start(params, space):
    """ConfigError unless params ({name: value}) is a configuration of space's parameters."""
    if not isinstance(params, dict) or not params:
        raise ConfigError("a start configuration is a table {param = value, …}, e.g. "
                          "start = [{lam = 1e-3}]")
    known = {p.name: p for p in _params(space)}
    for name, value in params.items():
        if name not in known:
            raise ConfigError(f"{name!r} is not a searched parameter (searched: "
                              f"{', '.join(known) or 'none'})")
        if not known[name].contains(value):
            raise ConfigError(f"{name} = {value!r} lies outside its range ({known[name]})")


def _params(space):
    """The parameters of a typed space (none known for a define-by-run callable)."""
    return space if is_typed(space) else ()


def _refs(pairs):
    return ", ".join(f"{s}#{n}" for s, n in pairs)


def _is_grid(sampler):
    return sampler in ("grid", "GridSampler") or (
        isinstance(sampler, dict) and sampler.get("name") in ("grid", "GridSampler"))


# What search.samplers.exercise passed in this process: a campaign is validated on every load and
# every --set, the same phases again and again, and an exercise costs ~16 ms of Optuna trials.
_EXERCISED = set()


def _exercise_key(phase, campaign, config, named_sampler, named_pruner):
    """Everything exercise's outcome depends on: the sampler as make_sampler builds it (spec,
    seed, grid, phase index), the pruner's spec, the space, the phase's config (the pruner's and
    the reports' steps) and its trials. A sampler or pruner object is not in it (a stand-in
    is exercised)."""
    return json.dumps([phase.sampler if named_sampler else None, campaign.seed, phase.grid,
                       campaign.index(phase.name), phase.pruner if named_pruner else None,
                       space_to_dict(phase.base_space(campaign)), dataclasses.asdict(config),
                       phase.n_trials], sort_keys=True, default=repr)


def _check(fn, key, fail):
    try:
        return fn()
    except ConfigError as e:
        fail(key, str(e))


def _space_text(items):
    from clr_lambda_search.search.report import space_text  # report reads studies; it never imports phases

    return space_text(items)


# ---- shared by the phase types ------------------------------------------------------------------

def pinned(config):
    """config with its precision resolved on this machine ("auto" -> fp32 or bf16): what a
    study records and pins, so that one study never mixes bf16 and fp32 trials (a runner that
    resolves it otherwise is refused when it opens the study)."""
    precision, why = resolve_precision(config.precision)
    if precision != config.precision and (config.precision, precision) not in _SAID:
        _SAID.add((config.precision, precision))  # once per process, not once per phase config
        log.info("precision %s resolved to %s (%s)", config.precision, precision, why)
    return dataclasses.replace(config, precision=precision)


_SAID = set()  # the (requested, resolved) precisions pinned() has logged


def finished(storage, campaign, phase):
    """Whether the phase's study holds its n_trials done trials, or has spent its budget."""
    name = phase.study_name(campaign.name)
    if name not in optuna.get_all_study_names(storage):
        return False
    study = optuna.load_study(study_name=name, storage=storage)
    spend = getattr(phase, "budget", None)
    if spend is not None and budget.spent(study.get_trials(deepcopy=False),
                                          spend.unit) >= spend.amount:
        return True
    # the trials it was run to (scripts/search.py coarse --n-trials 4), else the campaign's
    return n_done(study) >= (record.read(study).n_trials or phase.trials)


def require_finished(storage, campaign, name, needed_by):
    phase = campaign.phase(name)
    if not finished(storage, campaign, phase):
        study = phase.study_name(campaign.name)
        have = (n_done(optuna.load_study(study_name=study, storage=storage))
                if study in optuna.get_all_study_names(storage) else 0)
        raise InputError(f"phase {needed_by} is derived from phase {name}, which is not finished "
                         f"({have} of {phase.trials} complete trials in {study}"
                         + (f", its budget of {phase.budget} not spent"
                            if getattr(phase, "budget", None) is not None else "")
                         + "): run or resume "
                         f"phase {name} first")


def derive(storage, campaign, phase):
    """The narrowed space of `phase` and how it was derived: for each parameter of the phase it
    narrows, the span of that study's best top_k trials, widened by the margin (search.space.
    narrow) and clipped to that study's own range. The source phase must be finished, so that
    every runner derives the same range."""
    rule = phase.narrow
    require_finished(storage, campaign, rule["from"], phase.name)
    source = campaign.phase(rule["from"])
    study = load_study(storage, source.study_name(campaign.name))
    best = finished_trials(study)[:rule["top_k"]]
    if len(best) < rule["top_k"]:
        raise InputError(f"the study {study.study_name} has {len(best)} complete trials; phase "
                         f"{phase.name} narrows the best {rule['top_k']}: run or resume "
                         f"phase {rule['from']} with more trials first")
    recorded = record.read(study).space
    bounds = space_from_dict(recorded) if recorded else source.base_space(campaign)
    space = tuple(narrow(p, [t.params[p.name] for t in best], rule["margin"]) for p in bounds)
    info = {"from_study": study.study_name, "from_trials": [t.number for t in best],
            "top_k": rule["top_k"], "margin": rule["margin"],
            "rule": f"span of the best {rule['top_k']} trials of {study.study_name}, ± "
                    f"{rule['margin']} decades (log) or × the span (linear), clipped to its range"}
    return space, info


def candidates(run, phase):
    """The best top_k distinct configurations among the complete trials of the confirm phase's
    source studies (each finished): [{"params", "study", "trial", "val_acc"}], best first."""
    found = []
    for name in phase.sources:
        require_finished(run.storage, run.campaign, name, phase.name)
        study = load_study(run.storage, run.campaign.phase(name).study_name(run.campaign.name))
        found += [(t, study.study_name) for t in finished_trials(study)]
    found.sort(key=lambda item: item[0].value, reverse=True)
    out = []
    for t, source in found:
        if all(c["params"] != t.params for c in out):
            out.append({"params": dict(t.params), "study": source, "trial": t.number,
                        "val_acc": t.value})
        if len(out) == phase.top_k:
            break
    if len(out) < 2:
        raise InputError(f"the confirm phase compares {phase.top_k} configurations but "
                         f"{', '.join(phase.sources)} hold {len(out)} distinct complete trial(s): "
                         "run or resume the search phases first")
    return out


def round_values(trials):
    """{(candidate, seed): validation accuracy} of a confirm study's finished trials (a diverged
    training counts as accuracy 0: a configuration that diverges loses)."""
    values = {}
    for t in trials:
        key = record.queue_key(t)
        if key is None or key[0] != "confirm":
            continue
        if t.state == optuna.trial.TrialState.COMPLETE:
            values[key[1:]] = t.value
        elif record.is_diverged(t):
            values.setdefault(key[1:], 0.0)
    return values


def queue(run, study, items):
    """Queue each (params, attrs) whose key (search.record.queue_key) no trial holds yet, once
    across runners (under the study's lock)."""
    from clr_lambda_search.search.recovery import recover_trials

    with storage_lock(run.storage, study.study_name):
        recover_trials(study)  # a dead worker's trial is re-queued, not queued anew
        held = {record.queue_key(t) for t in study.get_trials(deepcopy=False)
                if record.trains_key(t)}
        for params, attrs in items:
            if record.key_of(attrs) not in held:
                study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
                held.add(record.key_of(attrs))


def open_study(run, name, wanted, metric=METRIC):
    """Create the phase's study (recording `wanted`, a StudyRecord) or check that an existing one
    is ours and matches it: trials scored on other data, or by another program, must never be
    ranked with this phase's."""
    check_foreign(run.storage, name)
    study = optuna.create_study(study_name=name, storage=run.storage, direction="maximize",
                                load_if_exists=True)
    recorded = record.read(study)
    for key in record.PINNED:
        have = getattr(recorded, key) if record.holds(study, key) else None
        want = getattr(wanted, key)
        # a key not there yet may be being written by a runner that created the study just now
        # (or was recorded by a release before it existed: it is recorded below)
        if have is not None and want is not None and not _same(key, have, want):
            raise InputError(_changed(name, key, have))
    record.write_missing(study, wanted)
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
    return study


def check_foreign(storage, name):
    """InputError when a study of this name exists but is not one of ours: another direction or
    several objectives, or trials without the record every phase of ours writes."""
    if name not in optuna.get_all_study_names(storage):
        return
    study = optuna.load_study(study_name=name, storage=storage)
    fix = "it was made by another program or another tool; use a new --campaign (or --storage)"
    if len(study.directions) != 1 or study.directions[0] != optuna.study.StudyDirection.MAXIMIZE:
        raise InputError(f"study {name} exists with direction(s) "
                         f"{[d.name.lower() for d in study.directions]}, not one maximised "
                         f"validation accuracy: {fix}")
    if not record.is_ours(study) and study.get_trials(deepcopy=False):
        raise InputError(f"study {name} exists and holds trials, but not this project's records: "
                         f"{fix}")


def same_config(recorded, wanted):
    """Whether a recorded TrainConfig (as a dict) is the wanted one (None: not recorded)."""
    return recorded is None or _same("config", recorded, wanted)


def _changed(name, key, recorded):
    """The one line refusing to resume study `name` whose pinned setting `key` differs."""
    if key == "precision":
        return (f"study {name}'s trials trained in {recorded}, and its precision resolves to "
                "another one on this machine (model.precision): resume it where it resolves the "
                f"same, set precision = \"{recorded}\" explicitly, or use a new --campaign")
    if key == "fingerprint":
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
        return space_from_dict(recorded) == space_from_dict(wanted)
    if key == "grid":  # the values tried, in any order
        def values(grid):
            return {k: sorted(v, key=repr) for k, v in grid.items()} if isinstance(grid, dict) \
                else grid
        return values(recorded) == values(wanted)
    return recorded == wanted


def run_phase_workers(run, study, objective, goal, total, sampler=None, pruner=None,
                      count=None, share_cpus=False, on_cpu_free=None):
    """Run this runner's workers on study until goal is met (search.workers.work); the phase's
    progress goes to run.report. A queued phase starts no more workers than it has queued
    trials; share_cpus (the final run's seeds): one process per queued trial, confined to
    run.workers CPUs, so that they finish together. Dead and terminated trials are re-queued
    once here, before the workers start: they would all re-queue the same trials."""
    from clr_lambda_search.search.recovery import recover_trials

    # a queued trial's parameters are given, and it trains to its end
    sampler = sampler or optuna.samplers.RandomSampler
    pruner = pruner or optuna.pruners.NopPruner()
    recover_trials(study)
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in study.get_trials(
        deepcopy=False))
    if isinstance(goal, TrialTarget):
        workers = run.workers
    elif share_cpus and run.workers > 1:
        workers = max(1, waiting)
    else:
        workers = max(1, min(run.workers, waiting))
    run.storage.remove_session()
    run.storage.engine.dispose()  # forked workers must open their own connections

    def progress():
        run.report(study.study_name, count(study.get_trials(deepcopy=False)), total)
    codes = run_workers(workers, progress=progress if run.progress and count else None,
                        storage_url=run.storage.url, study_name=study.study_name,
                        objective=objective, goal=goal, make_sampler=sampler, pruner=pruner,
                        storage_opts=run.storage_opts, on_cpu_free=on_cpu_free,
                        busy=lambda: sum(t.state in (optuna.trial.TrialState.RUNNING,
                                                     optuna.trial.TrialState.WAITING)
                                         for t in study.get_trials(deepcopy=False)),
                        cpus=run.workers if share_cpus else None)
    if any(codes) or not goal.done(study.get_trials(deepcopy=False)):
        raise WorkersFailed(f"{study.study_name}: workers exited with codes {codes} before the "
                            "phase was done; re-run the same command to resume")

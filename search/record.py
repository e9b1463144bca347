"""What a study stores about itself and its trials: one typed schema, read and written here only.

Runners on several machines coordinate through the storage alone, so everything a later phase
or another runner needs (the spec, the narrowed space, the candidates, the verdict, the final
pick) lives in the study; only large files (a final seed's parameters) are artifacts.

Where (record_version 3): the few short fields that say what a study is (campaign, phase, kind,
phase index, n_trials, retired, record_version) are its user attrs, so that `optuna studies`
and optuna-dashboard list a study on one short row; the rest (config, space, candidates,
verdict, …, kilobytes of JSON) are study system attrs under the prefix PREFIX. A study of an
earlier version (1: 03d5f40, no record_version; 2: everything in user attrs) keeps its record
where it is: it is read from the user attrs, and what a resumed one writes goes there too (no
public API deletes a user attr, so it cannot be moved).
"""
import contextlib
import dataclasses
import math

from optuna.trial import TrialState

from clr_lambda_search.model.errors import DivergedError, InputError, Terminated
from clr_lambda_search.search.optuna_internals import set_study_system_attr, study_system_attrs

VERSION = 3
LEGACY_VERSION = 2  # the last version that kept the whole record in user attrs
PREFIX = "clr_lambda_search:"  # the system attrs of the record's large fields (version 3)

# StudyRecord field -> user attr key (the keys of version 1, kept)
_KEYS = {"campaign": "campaign", "phase": "phase", "kind": "kind", "index": "phase_index",
         "config": "config", "space": "space", "sampler": "sampler", "grid": "grid",
         "pruner": "pruner", "repeats": "repeats", "seed": "seed", "n_trials": "n_trials",
         "digest": "campaign_digest", "narrowed": "narrowed", "fingerprint": "data_fingerprint",
         "precision": "precision", "candidates": "candidates", "seeds": "confirm_seeds",
         "verdict": "verdict", "pick": "pick", "source": "source", "derived_from": "derived_from",
         "retired": "retired", "budget": "budget", "start_queued": "start_queued",
         "version": "record_version"}
# The fields a study of version 3 keeps in its user attrs: short, and what a listing needs (a
# StudySummary carries user attrs only: search.study.campaign_studies reads kind and retired).
SHORT = ("campaign", "phase", "kind", "index", "n_trials", "retired", "version")
# Settings that must match when a study is resumed: changing them would mix incomparable trials.
# (a grid too: values of the same min and max span the same space, not the same trials)
PINNED = ("precision", "space", "config", "repeats", "fingerprint", "grid")


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    """A phase's study, as it describes itself."""

    campaign: str = None
    phase: str = None
    kind: str = "search"        # the phase type that wrote it (search.phases)
    index: int = 0              # the phase's position in its campaign
    config: dict = None         # TrainConfig of its trials (the searched fields left out)
    space: list = None          # search.space.space_to_dict of its parameters
    sampler: object = None      # labels (search.samplers)
    grid: dict = None
    pruner: object = None
    repeats: int = 1
    seed: int = 0               # the study seed its sampler draws from
    n_trials: int = None        # the trials the phase ends with
    digest: str = None          # of the resolved campaign
    narrowed: dict = None       # how the space was derived from an earlier phase
    fingerprint: str = None     # of the data its trials were scored on
    precision: str = None       # the resolved GEMM precision (fp32, bf16) of its trials
    candidates: list = None     # confirm: [{"params", "study", "trial", "val_acc"}]
    seeds: list = None          # confirm: the paired seeds; final: the training seeds
    verdict: dict = None        # confirm: search.confirm.verdict + sentence, params, scores
    pick: dict = None           # final: the parameters trained
    source: dict = None         # final: where the pick came from ({"study", "phase", "trial"})
    derived_from: list = None   # confirm: the (study, trial) of the top-k it was derived from
    retired: bool = None        # set by `retire`: kept for the record, never read as a phase
    budget: str = None          # search: its compute budget (search.budget), if it has one
    start_queued: bool = None   # search: its start configurations were queued
    version: int = VERSION

    @property
    def races(self):
        """Whether the study races candidates on paired seeds (a confirm phase): its trials are
        queued (candidate, seed) pairs, not a sampler's draws, and its views are its own."""
        return isinstance(self.candidates, list) and self.pick is None

    @property
    def is_phase(self):
        """Whether the study is one of its campaign's phases (not its final run, whose test
        accuracy must never be a pick; not a retired study)."""
        return self.kind != "final" and not self.retired


def stored(study):
    """The record's attrs of a study as stored, by key: its user attrs and (version 3) the
    record's system attrs (a StudySummary: its user attrs alone, the SHORT fields)."""
    attrs = dict(study.user_attrs)
    attrs.update({key[len(PREFIX):]: value for key, value in study_system_attrs(study).items()
                  if key.startswith(PREFIX)})
    return attrs


def _legacy(user_attrs):
    """Whether a study keeps its whole record in its user attrs (version 1 or 2). A study written
    now records record_version before anything else (write_missing): one that names a campaign
    or a phase but no version 3 is an older release's."""
    return ("phase" in user_attrs or "campaign" in user_attrs) \
        and user_attrs.get(_KEYS["version"], 1) < 3


def _set(study, field, value, legacy):
    if legacy or field in SHORT:
        study.set_user_attr(_KEYS[field], value)
    else:
        set_study_system_attr(study, PREFIX + _KEYS[field], value)


def read(study):
    """The StudyRecord of a study (or a FrozenStudy / StudySummary): of any release."""
    attrs = stored(study)
    values = {field: attrs[key] for field, key in _KEYS.items() if key in attrs}
    values.setdefault("version", 1)
    if "kind" not in values:  # version 1 wrote it for confirm studies only
        values["kind"] = ("final" if values.get("phase") == "final" and "pick" in attrs
                          else "confirm" if "candidates" in attrs else "search")
    if values.get("narrowed") is None and isinstance(attrs.get("fine_range"), dict):
        old = attrs["fine_range"]  # the releases that searched λ alone
        values["narrowed"] = {"from_study": old.get("coarse_study"),
                              "from_trials": old.get("from_trials"), "rule": old.get("rule")}
    return StudyRecord(**values)


def verdict(study):
    """The confirm verdict a study records, or None. It is read back from a storage (untrusted):
    InputError naming the study when it is malformed or names a candidate the study does not
    hold (its confirm phase records it anew when run again)."""
    rec = read(study)
    v = rec.verdict
    if v is None:
        return None
    cands = rec.candidates if isinstance(rec.candidates, list) else []
    pick = v.get("pick") if isinstance(v, dict) else None
    ok = (isinstance(pick, int) and not isinstance(pick, bool) and 0 <= pick < len(cands)
          and isinstance(v.get("params"), dict) and isinstance(v.get("sentence"), str)
          and all(isinstance(v.get(k), dict) for k in ("scores", "dropped", "means"))
          and all(isinstance(x, list) and all(finite(y) for y in x) for x in v["scores"].values())
          and v["scores"].get(str(pick))
          and all(finite(m) for m in v["means"].values()))
    if not ok:
        raise InputError(f"study {study.study_name}: its recorded verdict is malformed or names "
                         f"a candidate it does not hold (pick {str(pick)[:40]!r} of "
                         f"{len(cands)}); run its confirm phase again to record it anew")
    return v


def holds(study, field):
    """Whether the study records field `field` (read() gives a field it lacks its default)."""
    return _KEYS[field] in stored(study)


def write_missing(study, record):
    """Record what the study does not hold yet (a resumed study keeps what it recorded, and a
    key another runner wrote meanwhile is not overwritten); returns the record as stored. A new
    study gets record_version first (see _legacy); an older release's study is upgraded to
    version 2 (its layout: the record in its user attrs), not to this one."""
    have = stored(study)
    legacy = _legacy(study.user_attrs)
    if legacy:
        record = dataclasses.replace(record, version=LEGACY_VERSION)
    fields = sorted((f.name for f in dataclasses.fields(record)
                     if getattr(record, f.name) is not None), key=lambda f: f != "version")
    for field in fields:
        if _KEYS[field] not in have:
            _set(study, field, getattr(record, field), legacy)
    return read(study)


def update(study, **fields):
    """Write these record fields (e.g. verdict=…), whatever the study held."""
    legacy = _legacy(study.user_attrs)
    for name, value in fields.items():
        _set(study, name, value, legacy)


def is_ours(study):
    """Whether a study carries this project's record (a study without attrs and trials may have
    been created a moment ago by another runner: that is ours too)."""
    return "phase" in study.user_attrs or "campaign" in study.user_attrs


# ---- trials ------------------------------------------------------------------------------------
# Trial user attrs. A retried trial (a dead worker's, re-queued by Optuna) inherits its original's.
FAILURE = "failure"            # why the trial did not complete (none: its worker died)
CANDIDATE = "candidate"        # confirm: the index of the candidate it trains
CONFIRM_SEED = "confirm_seed"  # confirm: the seed it trains with
FINAL_SEED = "seed"             # final: the seed it trains with (the key of 03d5f40)
SURPLUS = "surplus: other workers completed the phase"
DUPLICATE = "duplicate: an earlier trial trains the same"
NOT_FINITE = "the objective returned a non-finite value"


def failure(t):
    return t.user_attrs.get(FAILURE)


def set_failure(trial, why):
    trial.set_user_attr(FAILURE, why if why is None else str(why)[:300])


@contextlib.contextmanager
def failure_said(trial):
    """Record why a training stopped on its trial (diverged, SIGTERM, Ctrl-C) and re-raise: a
    FAIL without a reason is a dead worker's to search.recovery, and would be re-queued."""
    try:
        yield
    except DivergedError as e:
        set_failure(trial, e)
        raise
    except Terminated:
        set_failure(trial, Terminated.FAILURE)  # retried by the next run
        raise
    except KeyboardInterrupt:
        set_failure(trial, "interrupted (Ctrl-C)")
        raise


def is_bookkeeping(t):
    """A trial that never trained: a surplus one or a duplicate (recorded as FAIL with why)."""
    return t.state == TrialState.FAIL and failure(t) in (SURPLUS, DUPLICATE)


def holds_key(t):
    """Whether trial t has, or will have, its key's result: not a dead worker's (recovery
    re-queues it), not a surplus or duplicate one (never trained)."""
    if t.state == TrialState.FAIL:
        return failure(t) not in (None, Terminated.FAILURE) and not is_bookkeeping(t)
    return True


def trains_key(t):
    """Whether trial t trains, will train or has trained its key: not a failed one (a new run
    queues a failed key again: its user was told to fix the cause and re-run) unless it
    diverged (a confirm phase's result; the same training would diverge again)."""
    return holds_key(t) and (t.state != TrialState.FAIL or is_diverged(t))


def is_diverged(t):
    return t.state == TrialState.FAIL and "diverged" in (failure(t) or "")


def queue_key(t):
    """What a queued trial trains ((candidate, seed) of a confirm trial, the seed of a final
    one), or None for a trial the sampler made."""
    return key_of(t.user_attrs)


def key_of(attrs):
    """queue_key of the trial queued with these user attrs."""
    if CANDIDATE in attrs:
        return ("confirm", attrs[CANDIDATE], attrs.get(CONFIRM_SEED))
    if FINAL_SEED in attrs:
        return ("final", attrs[FINAL_SEED])
    return None


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)

"""Every use of Optuna's private modules and attributes, in one place.

Each function says why no public API does its job. tests/test_optuna_internals.py exercises each
one against the installed Optuna and names the version when one breaks.
"""
import datetime

import numpy as np
import optuna
# no public module exports it; see reseed
from optuna.samplers._lazy_random_state import LazyRandomState
# a heartbeat-capable storage's interface: the gRPC client sends its heartbeats through the proxy
# (Optuna's gRPC client has none); public storages subclass it, no public module exports it
from optuna.storages._heartbeat import BaseHeartbeat  # noqa: F401 - re-exported for grpc_client
from optuna.trial import TrialState

# The logger Optuna's optimize loop reports a failed trial on, with its traceback (a private
# module's name): search/workers.py filters out its bookkeeping trials there.
OPTIMIZE_LOGGER = "optuna.study._optimize"


def reseed(sampler, seed):
    """Seed the random states of sampler and of the samplers it holds (TPE's startup sampler,
    CMA-ES's independent sampler, …). Optuna has no public API for it (reseed_rng draws a fresh
    random seed): we set their private LazyRandomState, which every optuna.samplers class keeps
    its draws in (tested for each class in tests/test_space.py)."""
    for value in vars(sampler).values():
        if isinstance(value, LazyRandomState):
            value.rng.seed(seed)
        elif isinstance(value, optuna.samplers.BaseSampler):
            reseed(value, seed)


def own_seed(sampler):
    """The seed a sampler object was built with (seed=…), None when it was built without one.

    Optuna keeps no seed: a sampler seeded at construction holds a seeded RandomState in its
    private LazyRandomState (an unseeded one makes it at its first draw), and MT19937's first
    state word is the seed (one below 2**32, before any draw). A state that has drawn, or was
    seeded with an array, gives a seed derived from the state: still one per seed."""
    def state_seed(rng):
        _, key, pos, *_ = rng.get_state()
        if pos == len(key) and np.array_equal(np.random.RandomState(int(key[0])).get_state()[1],
                                              key):
            return int(key[0])
        return int(np.random.SeedSequence([*key.tolist(), pos]).generate_state(1)[0])

    for value in vars(sampler).values():
        if isinstance(value, optuna.samplers.BaseSampler):
            found = own_seed(value)
        elif isinstance(value, LazyRandomState):
            found = state_seed(value._rng) if value._rng is not None else None
        else:
            continue
        if found is not None:
            return found
    return None


def rdb_storage(study):
    """The RDBStorage behind a study. Optuna wraps it in a private caching layer and a Study has
    no public accessor for its storage; the heartbeat settings and queries need it."""
    return getattr(study._storage, "_backend", study._storage)


def trial_id(trial):
    """The storage's id of a FrozenTrial (private FrozenTrial._trial_id): the storage's methods
    take it, and no public attribute holds it (number counts within a study only)."""
    return trial._trial_id


def max_retry(callback):
    """The max_retry of a RetryHeartbeatStaleTrialCallback (None when it has none): Optuna has no
    public accessor for it, and a storage opened elsewhere has its own."""
    return getattr(callback, "_max_retry", None)


def heartbeat_trial_ids(rdb):
    """The ids of the trials of an RDBStorage that have sent a heartbeat: no public API lists the
    heartbeats, so this reads Optuna's private table model."""
    from optuna.storages._rdb import models

    session = rdb.scoped_session()
    try:
        return {tid for (tid,) in session.query(models.TrialHeartbeatModel.trial_id)}
    finally:
        rdb.scoped_session.remove()


def claim_waiting(rdb, trial_id):
    """Set trial_id of an RDBStorage from WAITING to RUNNING in one conditional UPDATE, atomic on
    every database; whether this call claimed it (False: it was not WAITING). No public API updates
    a trial's state conditionally, so this goes through Optuna's private table model."""
    from optuna.storages._rdb import models

    session = rdb.scoped_session()
    try:
        claimed = session.query(models.TrialModel).filter(
            models.TrialModel.trial_id == trial_id,
            models.TrialModel.state == TrialState.WAITING,
        ).update({"state": TrialState.RUNNING, "datetime_start": datetime.datetime.now()},
                 synchronize_session=False)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        rdb.scoped_session.remove()
    return bool(claimed)


def make_grpc_server(storage, host, port):
    """A gRPC server (not started) serving `storage` at host:port. run_grpc_proxy_server, the
    public form, blocks until interrupted: the proxy needs the server object to recover dead
    workers' trials beside it and to stop it cleanly."""
    from optuna.storages._grpc.server import make_server

    return make_server(storage, host, port)


def study_system_attrs(study):
    """A study's system attrs (search.record keeps its large fields there). Study.system_attrs
    is gone since Optuna 3.1 (deprecated) and a Study has no public accessor for its storage and
    id, whose get_study_system_attrs is public; a FrozenStudy carries them publicly, a
    StudySummary holds none ({})."""
    if isinstance(study, optuna.Study):
        return study._storage.get_study_system_attrs(study._study_id)
    return getattr(study, "system_attrs", None) or {}


def set_study_system_attr(study, key, value):
    """Write a study system attr (the storage's public set_study_system_attr, reached through
    the Study's private _storage and _study_id; see study_system_attrs)."""
    study._storage.set_study_system_attr(study._study_id, key, value)


def startup_trials(obj):
    """A sampler's or pruner's n_startup_trials (None when it has none). Optuna keeps it in the
    private _n_startup_trials (TPESampler, MedianPruner, …); our MarginMedianPruner in a public
    one. Read only to size the scratch study that exercises it (search.samplers.exercise)."""
    for name in ("n_startup_trials", "_n_startup_trials"):
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None

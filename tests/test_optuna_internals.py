"""Each use of Optuna's private modules (search/optuna_internals.py), exercised directly: when an
Optuna upgrade moves or changes one, the failure names the Optuna version and the use."""
import ast
import importlib
import logging
import re
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from clr_lambda_search.search.study import open_storage

pytestmark = [pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


def changed(what):
    return (f"Optuna {optuna.__version__} changed a private API that search/optuna_internals.py "
            f"relies on: {what}")


@pytest.mark.parametrize("module, names", [
    ("optuna.samplers._lazy_random_state", ["LazyRandomState"]),
    ("optuna.storages._rdb.models", ["TrialModel", "TrialHeartbeatModel"]),
    ("optuna.storages._heartbeat", ["BaseHeartbeat", "is_heartbeat_enabled"]),
    ("optuna.storages._grpc.server", ["make_server"]),
    ("optuna.study._optimize", []),
])
def test_the_private_modules_still_exist(module, names):
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(changed(f"module {module} is gone ({e})"))
    for name in names:
        assert hasattr(found, name), changed(f"{module}.{name} is gone")


@pytest.fixture
def storage(tmp_path):
    return open_storage(f"sqlite:///{tmp_path / 's.db'}")


@pytest.mark.parametrize("cls", [optuna.samplers.RandomSampler, optuna.samplers.TPESampler])
def test_reseed_sets_the_samplers_draws(cls):
    from clr_lambda_search.search.optuna_internals import LazyRandomState, reseed

    def draw(construction_seed):
        sampler = cls(seed=construction_seed)
        reseed(sampler, 42)
        return optuna.create_study(sampler=sampler).ask().suggest_float("x", 0, 1)
    states = [v for v in vars(cls(seed=0)).values() if isinstance(v, LazyRandomState)]
    nested = [v for v in vars(cls(seed=0)).values() if isinstance(v, optuna.samplers.BaseSampler)]
    assert states or nested, changed(f"{cls.__name__} keeps no LazyRandomState attribute")
    # two samplers built with other seeds draw alike once reseeded alike: reseed reached the draws
    assert draw(1) == draw(2), changed(f"reseeding {cls.__name__}'s LazyRandomState has no effect")


@pytest.mark.parametrize("cls", [optuna.samplers.RandomSampler, optuna.samplers.TPESampler,
                                 optuna.samplers.NSGAIISampler, optuna.samplers.QMCSampler])
def test_own_seed_reads_the_seed_a_sampler_was_built_with(cls):
    from clr_lambda_search.search.optuna_internals import own_seed

    assert own_seed(cls(seed=42)) == 42, changed(f"{cls.__name__}(seed=42) keeps no seeded "
                                                 "LazyRandomState whose first state word is 42")
    assert own_seed(cls()) is None, changed(f"an unseeded {cls.__name__} has a seeded state")
    drawn = cls(seed=42)
    optuna.create_study(sampler=drawn).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert own_seed(drawn) not in (None, own_seed(cls(seed=7)))  # still one per seed


def test_rdb_storage_is_the_storage_behind_a_study(storage):
    from clr_lambda_search.search.optuna_internals import rdb_storage

    study = optuna.create_study(storage=storage)
    assert rdb_storage(study) is storage, changed(
        "Study._storage (a _CachedStorage with ._backend) no longer leads to the RDBStorage")


def test_trial_id_is_what_the_storage_takes(storage):
    from clr_lambda_search.search.optuna_internals import trial_id

    study = optuna.create_study(storage=storage)
    study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    try:
        tid = trial_id(frozen)
    except AttributeError:
        pytest.fail(changed("FrozenTrial._trial_id is gone"))
    assert storage.get_trial(tid).number == frozen.number, changed(
        "FrozenTrial._trial_id is not the storage's trial id")


def test_max_retry_reads_the_callbacks_setting():
    from clr_lambda_search.search.optuna_internals import max_retry

    # None would mean "no limit" to the caller: a renamed attribute must fail here, not there
    assert max_retry(RetryHeartbeatStaleTrialCallback(max_retry=3)) == 3, changed(
        "RetryHeartbeatStaleTrialCallback._max_retry is gone")


def test_heartbeat_trial_ids_lists_the_trials_that_beat(storage):
    from clr_lambda_search.search.optuna_internals import heartbeat_trial_ids, trial_id

    study = optuna.create_study(storage=storage)
    study.ask(), study.ask()
    silent, beating = (trial_id(t) for t in study.get_trials(deepcopy=False))
    assert heartbeat_trial_ids(storage) == set()
    storage.record_heartbeat(beating)
    assert heartbeat_trial_ids(storage) == {beating}, changed(
        "the trial_heartbeats table model (TrialHeartbeatModel.trial_id) reads otherwise")
    assert silent != beating


def test_claim_waiting_claims_a_queued_trial_once(storage):
    from clr_lambda_search.search.optuna_internals import claim_waiting, trial_id

    assert isinstance(storage, RDBStorage)
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 1.0})
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1
    tid = trial_id(waiting[0])
    assert claim_waiting(storage, tid) is True, changed("the conditional UPDATE of TrialModel "
                                                        "from WAITING to RUNNING claimed nothing")
    claimed = storage.get_trial(tid)
    assert claimed.state == TrialState.RUNNING and claimed.datetime_start is not None, changed(
        "a claimed trial is not RUNNING with a start time (TrialModel.state / datetime_start)")
    # the claim is conditional: a RUNNING trial is not claimed again
    assert claim_waiting(storage, tid) is False, changed("a RUNNING trial was claimed again")


def test_base_heartbeat_is_what_storages_with_heartbeats_subclass():
    from clr_lambda_search.search.grpc_client import ProxyClient
    from clr_lambda_search.search.optuna_internals import BaseHeartbeat

    assert issubclass(RDBStorage, BaseHeartbeat), changed(
        "RDBStorage no longer subclasses optuna.storages._heartbeat.BaseHeartbeat")
    missing = BaseHeartbeat.__abstractmethods__ - set(vars(ProxyClient))
    assert not missing, changed(f"BaseHeartbeat has new abstract methods {sorted(missing)}, "
                                "which the gRPC client (search/grpc_client.py) does not define")
    from optuna.storages._heartbeat import is_heartbeat_enabled

    class Beating(ProxyClient):  # ProxyClient without its gRPC connection
        def __init__(self):
            self._heartbeat_interval = 5
    assert is_heartbeat_enabled(Beating()), changed(
        "Optuna does not take a BaseHeartbeat with an interval for a storage with heartbeats")


def test_make_grpc_server_builds_a_server_not_started(storage):
    pytest.importorskip("grpc")  # the grpc extra; `make` installs it, so CI runs this
    from clr_lambda_search.search.optuna_internals import make_grpc_server

    try:
        server = make_grpc_server(storage, "127.0.0.1", 0)
    except (ImportError, TypeError) as e:
        pytest.fail(changed(f"optuna.storages._grpc.server.make_server(storage, host, port): {e}"))
    assert callable(getattr(server, "start", None)) and callable(getattr(server, "stop", None))
    server.stop(None)


def test_optuna_reports_a_failed_trial_on_the_logger_workers_filter():
    from clr_lambda_search.search.optuna_internals import OPTIMIZE_LOGGER

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    logger.addHandler(handler)
    verbosity = optuna.logging.get_verbosity()  # a script run in this process may have set ERROR
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        def fail(trial):
            raise RuntimeError("a deliberate failure")  # not Bookkeeping(: workers filters that
        optuna.create_study().optimize(fail, n_trials=1, catch=(RuntimeError,))
    finally:
        logger.removeHandler(handler)
        optuna.logging.set_verbosity(verbosity)
    assert any("a deliberate failure" in r.getMessage() for r in seen), changed(
        f"a failed trial is no longer logged on {OPTIMIZE_LOGGER!r}")


def test_every_private_use_is_here_and_tested():
    """No other module of model/ or search/ reaches into Optuna's private modules, and every
    name search/optuna_internals.py exports is exercised by a test of this file."""
    import clr_lambda_search.search.optuna_internals as internals

    root = Path(internals.__file__).resolve().parents[1]
    private = re.compile(r"optuna(\.\w+)*\._\w+")
    elsewhere = [f"{p.relative_to(root)}:{n}" for folder in ("model", "search")
                 for p in sorted((root / folder).rglob("*.py")) if p.name != "optuna_internals.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not elsewhere, f"private Optuna uses outside search/optuna_internals.py: {elsewhere}"
    tree = ast.parse(Path(internals.__file__).read_text())
    exported = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    exported |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name) and t.id.isupper()}
    exported |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                 and "._" in (n.module or "") for a in n.names}
    source = Path(__file__).read_text()
    untested = sorted(n for n in exported if not re.search(rf"\b{n}\b", source))
    assert not untested, f"search/optuna_internals.py exports {untested} with no test here"


def test_study_system_attrs_reach_the_storage(tmp_path):
    """search.record keeps its large fields in study system attrs through a Study's private
    _storage and _study_id."""
    from clr_lambda_search.search.optuna_internals import set_study_system_attr, study_system_attrs

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    try:
        set_study_system_attr(study, "k", {"a": [1]})
        seen = study_system_attrs(study)
    except AttributeError as e:
        pytest.fail(changed(f"Study._storage / Study._study_id ({e})"))
    assert seen["k"] == {"a": [1]}
    assert storage.get_study_system_attrs(storage.get_study_id_from_name("s"))["k"] == {"a": [1]}


def test_startup_trials_reads_the_samplers_and_pruners_count():
    from clr_lambda_search.search.optuna_internals import startup_trials

    assert startup_trials(optuna.samplers.TPESampler(n_startup_trials=7)) == 7, changed(
        "TPESampler no longer keeps n_startup_trials in _n_startup_trials")
    assert startup_trials(optuna.pruners.MedianPruner(n_startup_trials=4)) == 4, changed(
        "MedianPruner no longer keeps n_startup_trials in _n_startup_trials")
    assert startup_trials(optuna.samplers.RandomSampler()) is None

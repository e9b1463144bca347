"""The gRPC storage proxy's server: the project's claiming storage behind Optuna's servicer,
clients' heartbeats recorded as RDB heartbeats, and dead workers' trials recovered on the database
side (search.grpc_client is the workers' side; its docstring says why)."""
import logging
import signal
import threading

import optuna

from clr_lambda_search.model.errors import InputError
from clr_lambda_search.search.grpc_client import HEARTBEAT_ATTR, _grpc_module
from clr_lambda_search.search.optuna_internals import make_grpc_server
from clr_lambda_search.search.recovery import recover_trials
from clr_lambda_search.search.study import mask_url

log = logging.getLogger(__name__)


class _RelayHeartbeats:
    """The storage the proxy serves: the RDB storage (behind Optuna's cache), with a client's
    heartbeat attr recorded as the trial's RDB heartbeat."""

    def __init__(self, rdb):
        self._rdb = rdb
        self._served = optuna.storages.get_storage(rdb)

    def set_trial_system_attr(self, trial_id, key, value):
        if key == HEARTBEAT_ATTR:
            self._rdb.record_heartbeat(trial_id)
        else:
            self._served.set_trial_system_attr(trial_id, key, value)

    def __getattr__(self, name):
        return getattr(self._served, name)


def recover_all(rdb):
    """search.recovery.recover_trials on every study of the RDB storage (a study deleted
    meanwhile, such as a released lock, is skipped); the number of studies looked at."""
    seen = 0
    for frozen in rdb.get_all_studies():
        try:
            study = optuna.load_study(study_name=frozen.study_name, storage=rdb)
            recover_trials(study)
            seen += 1
        except KeyError:
            continue  # deleted since it was listed
    return seen


def serve(rdb, host, port, recovery_interval, ready=None, stop=None):
    """Serve rdb (a search.study.open_storage storage) at host:port until SIGTERM/SIGINT (or the
    stop event), recovering dead workers' trials every recovery_interval seconds. ready(): called
    once the server listens."""
    _grpc_module()
    stop = stop or threading.Event()
    try:
        server = make_grpc_server(_RelayHeartbeats(rdb), host, port)  # binds the port
    except RuntimeError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e}); choose another --host or "
                         "--port") from None
    server.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda *_: stop.set())
                    for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("storage proxy for %s listening on %s:%d", mask_url(rdb.url), host, port)
    if ready:
        ready()
    try:
        while not stop.wait(recovery_interval):
            try:
                recover_all(rdb)
            except Exception as e:  # a database hiccup: the next round tries again
                log.warning("recovery of dead workers' trials failed (%s: %s); retrying in %s s",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "", recovery_interval)
    finally:
        server.stop(grace=2).wait()
        for s, handler in previous.items():
            signal.signal(s, handler)

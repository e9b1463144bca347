"""Optuna's gRPC storage proxy, with the guarantees of a direct RDB storage kept: the client
side (search.grpc_server is the proxy's).

Many workers can reach one database through a proxy (`scripts/storage_proxy.py` in front of a
database URL; workers use `--storage grpc://host:port`): the workers hold one gRPC channel each
and the proxy the database connections. Optuna's GrpcStorageProxy has no heartbeat, so a killed
worker's trial would stay RUNNING for ever. Here:
- the proxy serves the project's claiming storage (search.study.open_storage: conditional claims
  of queued trials, heartbeats, the retry callback) behind Optuna's own servicer;
- a worker's client (ProxyClient) sends its heartbeats through the proxy as a trial system attr
  of a reserved key, which the proxy records as the RDB heartbeat instead of storing it;
- the proxy runs search.recovery's recover_trials on every study of the database every heartbeat
  interval: stale trials are failed and re-queued there, with the same parameters, as a worker
  on the database would do (the clients leave recovery to it).
"""
import logging
import signal
import threading
import warnings

import optuna
from clr_lambda_search.search.optuna_internals import BaseHeartbeat

from clr_lambda_search.model.errors import InputError

log = logging.getLogger(__name__)

SCHEME = "grpc://"
HEARTBEAT_ATTR = "clr:heartbeat"  # a client's heartbeat; the proxy records it, never stores it
CONNECT_TIMEOUT = 10  # seconds to reach the proxy


def is_grpc(url):
    return isinstance(url, str) and url.startswith(SCHEME)


def parse(url):
    """(host, port) of grpc://host:port; InputError otherwise."""
    rest = url[len(SCHEME):].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"malformed storage URL {url!r}; a storage proxy is grpc://host:port, "
                         "e.g. grpc://127.0.0.1:13000")
    return host.strip("[]"), int(port)


def _grpc_module():
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily: fail here, in one line)
        import google.protobuf  # noqa: F401
    except ImportError as e:
        raise InputError(f"the gRPC storage proxy needs {e.name}, which is not installed: "
                         "pip install 'clr-lambda-search[grpc]'") from None
    return grpc


def connect(url, heartbeat_interval):
    """A ProxyClient for grpc://host:port once the proxy answers; InputError when it does not."""
    host, port = parse(url)
    _grpc_module()
    client = ProxyClient(url, host, port, heartbeat_interval)
    try:
        client.wait_server_ready(timeout=CONNECT_TIMEOUT)
    except ConnectionError:
        client.close()
        raise InputError(f"no storage proxy answers at {url} (waited {CONNECT_TIMEOUT} s); start "
                         "scripts/storage_proxy.py there, or check --storage") from None
    return client


def _client_base():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        from optuna.storages import GrpcStorageProxy
    return GrpcStorageProxy


class ProxyClient(_client_base(), BaseHeartbeat):
    """GrpcStorageProxy that sends heartbeats (through the proxy, see the module docstring).

    Stale trials are found and failed by the proxy, so that this client reports none and has no
    retry callback. remove_session/engine.dispose/url are the RDBStorage surface the phases use
    before forking workers: the channel is closed (gRPC must not cross a fork) and reopened on
    the next call."""

    def __init__(self, url, host, port, heartbeat_interval):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(host=host, port=port)
        self.url = url
        self._heartbeat_interval = heartbeat_interval
        self.engine = _Channel(self)

    def record_heartbeat(self, trial_id):
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, True)

    def _get_stale_trial_ids(self, study_id):
        return []  # the proxy fails them

    def get_heartbeat_interval(self):
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return None  # the proxy re-queues them

    def remove_session(self):
        pass

    def __getstate__(self):
        state = super().__getstate__()
        del state["engine"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.engine = _Channel(self)


class _Channel:
    def __init__(self, client):
        self._client = client

    def dispose(self):
        self._client.close()
        self._client._setup()  # a new channel; it connects on its first call

"""The load test (tests/loadtest.py) in CI: the project's worker loop with a fast stand-in
objective against PostgreSQL directly, through the gRPC storage proxy, and on SQLite; no storage
error, no lost and no duplicated trial. Each prints its LOAD: line (pytest -s shows it).

CI runs 8 workers and 200 trials a storage; CLR_LOAD_WORKERS=64 (and CLR_LOAD_TRIALS, default
2000 then) runs the full figures of docs/many-machines.md (PostgreSQL needs max_connections
above ~150 for 64 direct workers). SQLite runs at most 8 workers: one machine's worth.
"""
import os
import uuid

import pytest

import faultlib as fl
import loadtest

pytestmark = [pytest.mark.load]

WORKERS = int(os.environ.get("CLR_LOAD_WORKERS", "8"))
TRIALS = int(os.environ.get("CLR_LOAD_TRIALS", "2000" if WORKERS >= 64 else "200"))


def check(figures):
    print(loadtest.load_line(figures))
    assert figures["trials"] == TRIALS, figures
    assert (figures["errors"], figures["lost"], figures["duplicated"]) == (0, 0, 0), figures


@pytest.mark.postgres
@pytest.mark.timeout(900)
@pytest.mark.parametrize("proxy", [False, True], ids=["direct", "grpc-proxy"])
def test_postgres_under_load(proxy):
    if proxy:
        pytest.importorskip("grpc", reason="the grpc extra (grpcio) is not installed")
    url = fl.pg_url_or_skip()
    fl.init_schema(url)
    name = f"load-{uuid.uuid4().hex[:10]}"
    try:
        figures = loadtest.run(url, WORKERS, TRIALS, proxy=proxy, study_name=name)
        assert figures["peak_connections"] > 0, figures  # the sampling saw the workers
        check(figures)
    finally:
        import optuna
        optuna.delete_study(study_name=name, storage=url)


@pytest.mark.timeout(900)
def test_sqlite_under_load(tmp_path):
    check(loadtest.run(fl.sqlite_url(tmp_path / "load.db"), min(WORKERS, 8), TRIALS))

"""Serve a study database to many workers through Optuna's gRPC storage proxy.

    python scripts/storage_proxy.py --storage postgresql+psycopg://user@dbhost/optuna \
        --host 0.0.0.0 --port 13000          # workers: --storage grpc://proxyhost:13000

The proxy holds the database connections (a few, whatever the number of workers) and keeps the
guarantees of a direct connection: queued trials claimed once, heartbeats (relayed from the
workers), and a dead worker's trial failed and re-queued with the same parameters after the
grace period (the proxy looks every --heartbeat-interval seconds). Runs until Ctrl-C or SIGTERM.
The port is unauthenticated and unencrypted: bind it to a private network only.
"""
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.search.cli.args import Parser, add_heartbeat_args, storage_opts
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import setup_logging
from clr_lambda_search.search.grpc_client import is_grpc
from clr_lambda_search.search.grpc_server import serve
from clr_lambda_search.search.study import check_storage, mask_url, open_storage


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_storage()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=13000, help="port to listen on")
    add_heartbeat_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, not {args.port}")
    args.storage_opts = storage_opts(p, args)
    return args


def main():
    args = parse_args()
    setup_logging(args)
    if is_grpc(args.storage):
        raise InputError("--storage is the database the proxy serves, not another proxy "
                         f"({args.storage}); give its SQLAlchemy URL")
    check_storage(args.storage)
    storage = open_storage(args.storage, **args.storage_opts)
    url = f"grpc://{args.host}:{args.port}"

    def ready():
        print(f"storage proxy for {mask_url(args.storage)} on {url} (Ctrl-C stops)", flush=True)
    serve(storage, args.host, args.port, args.heartbeat_interval, ready=ready)
    print("storage proxy stopped", flush=True)
    return 0


if __name__ == "__main__":
    run(main)

"""Write a campaign's dashboard page, or serve optuna-dashboard on the same storage.

    python scripts/dashboard.py [--campaign cifar10 | --study NAME] [--out studies/cifar10/dashboard.html]
    python scripts/dashboard.py --serve [--port 8080] [--allow-writes]

The page is self-contained (plotly.js inlined, opens offline): for every study of the campaign,
Optuna's optimization history, a slice per parameter, with two parameters or more the contour,
parallel-coordinate and importance figures, intermediate values, EDF, timeline and a trials
table; how a narrowed phase was derived; the final run's curves and test accuracy. Re-running
refreshes it.

--serve is read-only unless --allow-writes: only GET and HEAD reach optuna-dashboard, and the
artifacts are served so that none can run script in the dashboard's origin.
"""
import socket
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from clr_lambda_search.model.checkpoint import save_page
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.outputs import check_page
from clr_lambda_search.search.campaign import check_name
from clr_lambda_search.search.cli.args import (Parser, add_campaign_args, add_common_args,
                                              add_set_arg)
from clr_lambda_search.search.cli.configs import campaign, resolved
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.output import emit, setup_logging
from clr_lambda_search.search.cli.storage import protected_paths
from clr_lambda_search.search.final import artifact_dir, read_final
from clr_lambda_search.search.plots import dashboard_html
from clr_lambda_search.search.study import campaign_studies, mask_url, named_study, open_storage, outputs_dir


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_campaign_args(p, "the campaign to show (default: the --config file's)")
    p.add_argument("--study", default=None, help="show this one study (any name) instead")
    p.add_storage()
    p.add_argument("--out", default=None, help="page path (default studies/<campaign>/dashboard.html; studies/<campaign>-<digest>/ for a storage other than the default)")
    p.add_argument("--final-dir", default=None, help="final results (default studies/<campaign>/final; -<digest> for another storage)")
    p.add_argument("--serve", action="store_true", help="start optuna-dashboard instead")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080, help="--serve: port (1..65535)")
    p.add_argument("--allow-writes", action="store_true",
                   help="--serve: let the dashboard change the storage (delete studies, notes, "
                        "artifacts); by default it is read-only")
    add_set_arg(p)
    add_common_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port {args.port} must lie in 1..65535")
    return args


READING = ("GET", "HEAD")
ARTIFACT_HEADERS = [("Content-Security-Policy", "sandbox; default-src 'none'"),
                    ("X-Content-Type-Options", "nosniff")]


def read_only(app):
    """The WSGI app answering every request but GET and HEAD with 405: nothing is written."""
    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() in READING:
            return app(environ, start_response)
        start_response("405 Method Not Allowed", [("Allow", ", ".join(READING)),
                                                  ("Content-Type", "text/plain; charset=utf-8")])
        return [b"read-only dashboard: restart it with --allow-writes to change the storage\n"]
    return guarded


def safe_artifacts(app):
    """The WSGI app whose artifact responses run nothing in the dashboard's origin, whatever MIME
    type the storage records: sandboxed (no script, an opaque origin, no subresource), never
    sniffed, and not readable from other origins (no Access-Control-Allow-Origin). (Served as
    an attachment instead, an HTML artifact in a frame hung headless Chromium here.)"""
    def wrapped(environ, start_response):
        if not environ.get("PATH_INFO", "").lstrip("/").startswith("artifacts"):
            return app(environ, start_response)

        def start(status, headers, exc_info=None):
            kept = [(k, v) for k, v in headers if k.lower() not in (
                "access-control-allow-origin", "content-disposition",
                "content-security-policy", "x-content-type-options")]
            return start_response(status, kept + ARTIFACT_HEADERS, exc_info)
        return app(environ, start)
    return wrapped


class _Quiet(WSGIRequestHandler):
    def address_string(self):  # no reverse DNS lookup per request
        return self.client_address[0]


def listen(host, port, app):
    """A WSGI server bound to host:port; InputError (one line) when it cannot be."""
    server_class = WSGIServer
    if ":" in host:
        class server_class(WSGIServer):
            address_family = socket.AF_INET6
    try:
        return make_server(host, port, app, server_class, _Quiet)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: unknown host ({e.strerror}); use an address such as "
                         "127.0.0.1") from None
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise InputError(f"cannot listen on {host}:{port}: {why}; choose another --port or "
                         "--host") from None


def serve(args, storage, artifacts):
    """optuna-dashboard on the storage, showing the final run's files (artifacts) when there are;
    read-only unless --allow-writes."""
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise InputError("optuna-dashboard is not installed: pip install "
                         "'clr-lambda-search[dashboard]' (or use the page without --serve)") from None
    store = None
    if artifacts.is_dir():
        from optuna.artifacts import FileSystemArtifactStore

        store = FileSystemArtifactStore(str(artifacts))
    app = safe_artifacts(wsgi(storage, artifact_store=store))
    server = listen(args.host, args.port, app if args.allow_writes else read_only(app))
    mode = "read-write" if args.allow_writes else "read-only, --allow-writes to change it"
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ for {mask_url(args.storage)} "
          + (f"with the artifacts in {artifacts} " if store else "")
          + f"({mode}; Ctrl-C stops)", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def main():
    args = parse_args()
    setup_logging(args)
    if args.set:  # checked against the campaign, as on every command (the page shows the studies)
        resolved(args)
    name = args.study or args.campaign or campaign(args).name
    check_name(name, "--study" if args.study else "--campaign")
    out = Path(args.out or outputs_dir(name, args.storage) / "dashboard.html")
    protect = protected_paths(args.storage)
    if not args.serve:
        check_page(out, protect)
    storage = open_storage(args.storage, create=False)
    final_dir = Path(args.final_dir or outputs_dir(name, args.storage) / "final")
    if args.serve:
        return serve(args, storage, artifact_dir(final_dir))
    studies = named_study(storage, args.study) if args.study else campaign_studies(storage, name)
    final = read_final(final_dir)
    page = dashboard_html(name, mask_url(args.storage), studies, final)
    save_page(out, page, protect)
    emit({"out": str(out), "studies": [s.study_name for s in studies],
                  "final": bool(final), "figures": page.count('class="plotly-graph-div"')}, args,
                 f"dashboard -> {out}")
    return 0


if __name__ == "__main__":
    run(main)

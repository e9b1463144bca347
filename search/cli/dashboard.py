"""Write a campaign's dashboard page, or serve optuna-dashboard on the same storage.

    python scripts/dashboard.py [--campaign cifar10 | --study NAME] [--out studies/cifar10/dashboard.html]
    python scripts/dashboard.py --serve [--port 8080]

The page is self-contained (plotly.js inlined, opens offline): for every study of the campaign,
Optuna's optimization history, a slice per parameter, with two parameters or more the contour,
parallel-coordinate and importance figures, intermediate values, EDF, timeline and a trials
table; how a narrowed phase was derived; the final run's curves and test accuracy. Re-running
refreshes it.
"""
from pathlib import Path

from model.checkpoint import save_page
from model.errors import InputError
from model.outputs import check_page
from search.campaign import check_name
from search.cli.args import Parser, add_campaign_args, add_common_args
from search.cli.configs import campaign
from search.cli.errors import run
from search.cli.output import emit, setup_logging
from search.cli.storage import protected_paths
from search.final import artifact_dir, read_final
from search.plots import dashboard_html
from search.study import campaign_studies, mask_url, named_study, open_storage


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_campaign_args(p, "the campaign to show (default: the --config file's)")
    p.add_argument("--study", default=None, help="show this one study (any name) instead")
    p.add_storage()
    p.add_argument("--out", default=None, help="page path (default studies/<campaign>/dashboard.html)")
    p.add_argument("--final-dir", default=None, help="final results (default studies/<campaign>/final)")
    p.add_argument("--serve", action="store_true", help="start optuna-dashboard instead")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080, help="--serve: port")
    add_common_args(p)
    return p.parse_args(argv)


def serve(args, storage, artifacts):
    """optuna-dashboard on the storage, showing the final run's files (artifacts) when there are."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise InputError("optuna-dashboard is not installed: pip install "
                         "'clr-lambda-search[dashboard]' (or use the page without --serve)") from None
    store = None
    if artifacts.is_dir():
        from optuna.artifacts import FileSystemArtifactStore

        store = FileSystemArtifactStore(str(artifacts))
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ for {mask_url(args.storage)} "
          + (f"with the artifacts in {artifacts} " if store else "") + "(Ctrl-C stops)", flush=True)
    run_server(storage, host=args.host, port=args.port, artifact_store=store)
    return 0


def main():
    args = parse_args()
    setup_logging(args)
    name = args.study or args.campaign or campaign(args).name
    check_name(name, "--study" if args.study else "--campaign")
    out = Path(args.out or f"studies/{name}/dashboard.html")
    protect = protected_paths(args.storage)
    if not args.serve:
        check_page(out, protect)
    storage = open_storage(args.storage, create=False)
    final_dir = Path(args.final_dir or f"studies/{name}/final")
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

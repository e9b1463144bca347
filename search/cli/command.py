"""clr-search COMMAND [ARGS]: one command for every program of the project.

Each command is one of the programs in search/cli (scripts/NAME.py launches the same code);
`clr-search COMMAND --help` shows its flags.
"""
import difflib
import importlib
import sys

# command -> (module in search/cli, arguments put before the user's, one line of help)
COMMANDS = {
    "pipeline": ("pipeline", [], "the whole campaign: gradient check, phases, final run, outputs"),
    "phase": ("search", [], "run one search phase of a campaign (PHASE [flags]), resumable"),
    "confirm": ("search", ["confirm"], "run the confirm phase: paired seeds for the top picks"),
    "status": ("search", ["status"], "show a campaign's studies, or one study"),
    "retire": ("search", ["retire"], "retire a phase's study (and what derives from it)"),
    "final": ("final", [], "train the best configuration on train+val, evaluate once on test"),
    "dashboard": ("dashboard", [], "write the HTML dashboard, or --serve optuna-dashboard"),
    "train": ("train", [], "train one configuration and plot its curves"),
    "gradcheck": ("gradcheck", [], "analytic vs numerical gradients"),
    "bench": ("bench", [], "speed ratios against the GEMM floor"),
    "storage-proxy": ("storage_proxy", [], "serve a storage to many workers over gRPC"),
}


def usage():
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return ("usage: clr-search COMMAND [ARGS]   (clr-search COMMAND --help for its flags)\n\n"
            "commands:\n" + "\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from clr_lambda_search import __version__
        print(f"clr-search {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hint = next(iter(difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.5)), None)
        sys.stderr.write(f"error: unknown command {name!r}"
                         f"{f' (did you mean {hint!r}?)' if hint else ''}; "
                         f"one of: {', '.join(COMMANDS)}\n")
        return 2
    module, before, _ = COMMANDS[name]
    program = importlib.import_module(f"clr_lambda_search.search.cli.{module}")
    sys.argv = [f"clr-search {name}", *before, *rest]
    return program.main()


def console():
    """The clr-search entry point: main() with the programs' error handling."""
    from clr_lambda_search.search.cli.errors import run
    run(main)

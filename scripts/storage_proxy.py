"""Launcher of search.cli.storage_proxy (its docstring and --help say what it does)."""
import sys
from pathlib import Path

# sys.path[0] is this folder, where search.py would shadow the search package: drop it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from search.cli.errors import run  # noqa: E402
from search.cli.storage_proxy import main  # noqa: E402

if __name__ == "__main__":
    run(main)

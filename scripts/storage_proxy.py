"""Launcher of clr_lambda_search.search.cli.storage_proxy (its docstring and --help say what it does)."""
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.cli.storage_proxy import main

if __name__ == "__main__":
    run(main)

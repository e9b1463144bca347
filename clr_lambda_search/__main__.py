"""python -m clr_lambda_search COMMAND …: the same as the clr-search command."""
from clr_lambda_search.search.cli.command import console

if __name__ == "__main__":
    console()

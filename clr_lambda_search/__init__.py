"""clr-lambda-search: an Optuna search of a NumPy CLR network's regularisation.

The installed import name of the project's two source folders: `clr_lambda_search.model` (the
NumPy trainer, folder model/) and `clr_lambda_search.search` (the Optuna layer, folder search/),
mapped by pyproject.toml, so a user's own `model.py` or `search/` never shadows them. The Python
API is `clr_lambda_search.search.api`; the command is `clr-search` (`python -m clr_lambda_search`).
"""
from importlib import metadata
from pathlib import Path

# In a source checkout, model/ and search/ sit beside this folder: found from here whether the
# checkout is installed (editable) or only on sys.path (a worktree, `python -m pytest` run in it),
# so the checkout imported is always the one whose clr_lambda_search/ was imported.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "search" / "__init__.py").is_file():
    __path__.append(str(_checkout))

try:
    __version__ = metadata.version("clr-lambda-search")
except metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

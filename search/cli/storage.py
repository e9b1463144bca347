"""A command's storage URL: where it comes from, its secrets kept out of every line printed, and
its files kept from being overwritten by an output."""
import logging
import os

from clr_lambda_search.model.errors import InputError
from clr_lambda_search.search.study import DEFAULT_STORAGE, redact, sqlite_path

STORAGE_ENV = "OPTUNA_STORAGE"  # what Optuna's own CLI reads: keeps a password out of `ps`
_storage_urls = []  # every storage URL given to this process: its secrets never reach stderr


def storage_url(flag=None):
    """The storage URL: the --storage flag, else $OPTUNA_STORAGE, else the default SQLite file.
    Its secrets are registered: fail() and the log hide them."""
    url = flag or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    _storage_urls.append(url)
    return url


def protected_paths(url):
    """The files an output may never be or contain: an SQLite storage and its journal files."""
    try:
        path = sqlite_path(url)
    except InputError:
        return ()  # a malformed URL: opening the storage reports it
    if path is None:
        return ()
    return (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal")))


def hide_secrets(text):
    for url in _storage_urls:
        text = redact(text, url)
    return text


class HideSecrets(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        hidden = hide_secrets(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True

"""A command's errors: one line on stderr, exit 2 for bad input, 1, 130 or 143 otherwise; a bug
is one line too, naming the file its traceback was written to."""
import errno
import os
import re
import signal
import sys
import tempfile
import traceback

import sqlalchemy
from optuna.exceptions import StorageInternalError

from clr_lambda_search.model.errors import DivergedError, InputError, Terminated, WorkersFailed
from clr_lambda_search.model.resources import is_write_problem, write_problem
from clr_lambda_search.search.cli.storage import hide_secrets
from clr_lambda_search.search.study import storage_failure

EXIT_BAD_INPUT = 2


def fail(message):
    """One line on stderr, exit status 2, no traceback (a message of several lines, such as a
    library's, is joined into one)."""
    sys.stderr.write(f"error: {one_line(hide_secrets(str(message)))}\n")
    sys.exit(EXIT_BAD_INPUT)


LONGEST_WORD = 120  # characters of one word an error echoes (a 5,000-character name: its start)


def one_line(text):
    """text on one line, every word longer than LONGEST_WORD cut to its start and its length."""
    return re.sub(rf"\S{{{LONGEST_WORD + 1},}}",
                  lambda m: f"{m.group()[:LONGEST_WORD - 20]}…({len(m.group())} characters)",
                  " ".join(text.splitlines()))


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up
    raise Terminated()


def report_bug(error):
    """One line on stderr for an unexpected exception (a bug, not bad input) naming the file that
    holds its traceback (secrets hidden), exit status 1."""
    text = hide_secrets("".join(traceback.format_exception(error)))
    if os.environ.get("CLR_DEBUG"):
        sys.stderr.write(text)
    try:
        fd, path = tempfile.mkstemp(prefix="clr-lambda-search-bug-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(hide_secrets(' '.join(sys.argv)) + "\n\n" + text)
        where = f"traceback in {path}"
    except OSError as e:
        where = f"the traceback could not be written ({e.strerror or e}); CLR_DEBUG=1 prints it"
    message = hide_secrets(" ".join(str(error).split()))[:300]
    sys.stderr.write(f"error: unexpected {type(error).__name__} (a bug, not your input"
                     f"{': ' + message if message else ''}); {where}; please report it\n")
    sys.exit(1)


def run(main):
    """Run main(); user errors become one line and exit 2, Ctrl-C exits 130 and SIGTERM 143 with
    one line (SIGTERM raises Terminated, in this process and in its forked workers); any other
    exception is a bug: one line naming its traceback's file (report_bug), exit 1."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except InputError as e:
        fail(str(e))
    except BrokenPipeError:  # `clr-search status | head`: the reader left, as with any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # a path typed too long: the input, not a bug
            fail(f"{e.filename or 'a path'}: the name is too long for this system; give a "
                 "shorter path")
        if not is_write_problem(e):
            report_bug(e)
        # a full disk, a read-only folder: the environment's fault, named, without a traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        fail(f"cannot write{where}: {write_problem(e)}; free space or choose another place "
             "(--out, --storage, $CIFAR10_CACHE)")
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as e:
        why = storage_failure(e)
        if why is None:
            report_bug(e)
        if os.environ.get("CLR_DEBUG"):
            traceback.print_exc()
        fail(why)
    except (WorkersFailed, DivergedError) as e:  # not the input's fault: exit 1, still one line
        sys.stderr.write(f"error: {one_line(hide_secrets(str(e)))}\n")
        sys.exit(1)
    except Terminated:
        sys.stderr.write("terminated: running trials were marked FAIL and are retried by the next "
                         "run; partial results were not written; re-run to resume\n")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: partial results were not written; re-run to resume\n")
        sys.exit(130)
    except Exception as e:  # a bug: not the input's fault
        report_bug(e)

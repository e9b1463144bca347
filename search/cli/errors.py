"""A command's errors: one line on stderr, exit 2 for bad input, 1, 130 or 143 otherwise."""
import signal
import sys

import sqlalchemy
from optuna.exceptions import StorageInternalError

from model.errors import DivergedError, InputError, Terminated, WorkersFailed
from model.resources import is_write_problem, write_problem
from search.cli.storage import hide_secrets
from search.study import storage_failure

EXIT_BAD_INPUT = 2


def fail(message):
    """One line on stderr, exit status 2, no traceback."""
    sys.stderr.write(f"error: {hide_secrets(str(message))}\n")
    sys.exit(EXIT_BAD_INPUT)


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up
    raise Terminated()


def run(main):
    """Run main(); user errors become one line and exit 2, Ctrl-C exits 130 and SIGTERM 143 with
    one line (SIGTERM raises Terminated, in this process and in its forked workers)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except InputError as e:
        fail(str(e))
    except OSError as e:
        if not is_write_problem(e):
            raise
        # a full disk, a read-only folder: the environment's fault, named, without a traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        fail(f"cannot write{where}: {write_problem(e)}; free space or choose another place "
             "(--out, --storage, $CIFAR10_CACHE)")
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as e:
        why = storage_failure(e)
        import os, traceback
        if os.environ.get("CLR_DEBUG"):
            traceback.print_exc()
        if why is None:
            raise
        fail(why)
    except (WorkersFailed, DivergedError) as e:  # not the input's fault: exit 1, still one line
        sys.stderr.write(f"error: {hide_secrets(str(e))}\n")
        sys.exit(1)
    except Terminated:
        sys.stderr.write("terminated: running trials were marked FAIL and are retried by the next "
                         "run; partial results were not written; re-run to resume\n")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: partial results were not written; re-run to resume\n")
        sys.exit(130)

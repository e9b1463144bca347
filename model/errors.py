"""Exceptions that mean "the user asked for something wrong": scripts turn them into one line, exit 2."""


class InputError(ValueError):
    """Bad input a user can fix; the message names the problem and the fix."""


class ConfigError(InputError):
    """A training or search setting is out of range."""


class DataError(InputError):
    """The data set is missing, corrupt, hostile or fails its checksum."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, SLURM, Kubernetes): stop like Ctrl-C, but the running trials are
    retried by the next run (a preempted job must not lose its trial). A KeyboardInterrupt, so
    that every clean-up Ctrl-C gets runs for it too."""

    FAILURE = "terminated"


class WorkersFailed(RuntimeError):
    """Search workers stopped before their phase reached its number of trials."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss (λ or η_max too large)."""

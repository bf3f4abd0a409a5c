"""Every exception the program turns into an exit status, each with a one-line, user-facing message.

``main`` maps them to exit statuses: ConfigError, DataError and CheckpointError -> 2,
NonFiniteError -> 3, Preempted -> 75 (SIGTERM) or 130 (SIGINT) (docs/ERRORS.md).
"""

import signal
import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to change."""


class DataError(ValueError):
    """Input data is missing, corrupt or too small; the message names the file or dataset."""


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message lists the mismatches."""


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under ``nonfinite_policy='stop'``."""

    exit_code = 3


class Preempted(Exception):
    """SIGTERM or SIGINT (or a multi-host preemption notice) arrived; a checkpoint was written at ``step``."""

    exit_code = 75  # EX_TEMPFAIL: try again later (rerun the same command to resume)

    def __init__(self, step: int, directory: str, signum: int | None = None):
        what = "interrupted (SIGINT)" if signum == signal.SIGINT else "preempted"
        super().__init__(f"{what}: checkpoint written at step {step} in {directory}; rerun to resume")
        self.step = step
        self.exit_code = self.exit_status(signum)

    @staticmethod
    def exit_status(signum: int | None) -> int:
        """75 for SIGTERM (and preemption notices: None), 130 (128 + 2, the shell's convention) for SIGINT."""
        return 130 if signum == signal.SIGINT else 75


def report(e: BaseException) -> int | None:
    """Prints the one-line message of an expected failure to stderr and returns its exit status; None
    for any other exception (a bug, or the system's), which keeps its traceback.

    An OSError naming a file (missing directory, no permission, disk full) is an expected failure too.
    """
    if isinstance(e, (ConfigError, DataError, CheckpointError)):
        message, status = f"error: {e}", 2
    elif isinstance(e, OSError) and e.filename is not None:
        message, status = f"error: {e.filename}: {e.strerror}", 2
    elif isinstance(e, (Preempted, NonFiniteError)):
        message, status = f"{type(e).__name__}: {e}", e.exit_code
    else:
        return None
    print(message, file=sys.stderr)
    return status


def exit_status_of(run: Callable[[], object]) -> int:
    """Calls ``run()``: 0 when it returns, the reported status of an expected failure (``report``)."""
    try:
        run()
    except Exception as e:
        status = report(e)
        if status is None:
            raise
        return status
    return 0


def read_bytes(path: str, error: type[Exception], where: str) -> bytes:
    """The contents of ``path``; ``error`` naming ``where`` when the system cannot read it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise error(f"{where}: cannot read {path} ({e.strerror})") from None

"""Every exception the program turns into an exit status, each with a one-line, user-facing message.

``main`` maps them to exit statuses: ConfigError, DataError and CheckpointError -> 2,
NonFiniteError -> 3, Preempted -> 75 (SIGTERM), 130 (SIGINT) or 129 (SIGHUP) (docs/ERRORS.md). The file
reads and writes at the end fail with errors that name their file, so that a full disk too is one line.
"""

import contextlib
import errno
import os
import shutil
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
    """SIGTERM, SIGINT or SIGHUP (or a multi-host preemption notice) arrived; a checkpoint was written at
    ``step``."""

    exit_code = 75  # EX_TEMPFAIL: try again later (rerun the same command to resume)

    def __init__(self, step: int, directory: str, signum: int | None = None):
        what = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGHUP: "hung up (SIGHUP)"}.get(
            signum, "preempted"
        )
        super().__init__(f"{what}: checkpoint written at step {step} in {directory}; rerun to resume")
        self.step = step
        self.exit_code = self.exit_status(signum)

    @staticmethod
    def exit_status(signum: int | None) -> int:
        """75 for SIGTERM (and preemption notices: None); 128 + the signal's number, the shell's convention,
        for SIGINT (130) and SIGHUP (129), which no restart loop resumes (``signals``' docstring says why)."""
        return 128 + signum if signum in (signal.SIGINT, signal.SIGHUP) else 75


def report(e: BaseException) -> int | None:
    """Prints the one-line message of an expected failure to stderr and returns its exit status; None
    for any other exception (a bug, or the system's), which keeps its traceback.

    An OSError naming a file (missing directory, no permission, disk full) is an expected failure too; a
    full disk or quota also says how much space is left there.
    """
    if isinstance(e, (ConfigError, DataError, CheckpointError)):
        message, status = f"error: {e}", 2
    elif isinstance(e, OSError) and e.filename is not None:
        full = e.errno in _FULL
        space = f" ({getattr(e, 'free_space', None) or free_space(e.filename)})" if full else ""
        message, status = f"error: {e.filename}: {e.strerror}{space}", 2
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


def write_atomically(path: str, data: bytes) -> None:
    """Writes ``path`` whole or not at all: a kill at any moment leaves the old file or the new one, and so
    does a failed write (disk full), whose OSError names ``path``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        failure = _naming(path, e)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise failure from None


def append_line(path: str, line: str) -> None:
    """Appends ``line`` to ``path`` in one write, or nothing: a write that fails part-way (disk full) is cut
    back off the file, so no torn line is left; its OSError names ``path``."""
    data = line.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise _naming(path, e) from None
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) < len(data):  # a short write: the file system is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            failure = _naming(path, e)
            os.ftruncate(fd, size)
            raise failure from None
    finally:
        os.close(fd)


_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota


def _naming(path: str, e: OSError) -> OSError:
    """``e`` as an OSError naming ``path``; a full disk's also holds the space left when it failed, before
    the part written is removed (``report`` prints it)."""
    failure = OSError(e.errno, e.strerror, path)
    if e.errno in _FULL:
        failure.free_space = free_space(path)
    return failure


def free_space(path: str) -> str:
    """'N MiB free on its file system': the space left where ``path`` is, or would be, written."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    try:
        free = float(shutil.disk_usage(existing).free)
    except OSError:
        return "free space unknown"
    unit = "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if free < 1024:
            break
        free, unit = free / 1024, larger
    amount = f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
    return f"{amount} free on its file system"

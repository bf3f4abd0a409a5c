"""One run per workdir: ``check_workdir`` creates it, proves it writable and locks it; ``hold(workdir)``
locks ``WORKDIR/.lock`` until this process ends, or refuses with a ConfigError naming the workdir and the
run holding it (host, pid, start time).

The lock is the kernel's (``flock``), so it goes with the process that holds it: a run killed by SIGKILL,
the OOM killer or a lost host leaves nothing that blocks its restart, and the file's text only names the
holder. A multi-host run holds one lock, in process 0; the other processes write into the workdir
without one. Held per process, so the phases of a chain (demo, study) and a notebook's repeated runs
re-enter it. On a file system without locks (some network and FUSE mounts) the run goes on unlocked,
with a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time

from hybrid_distill_jax.errors import ConfigError

LOCK_FILE = ".lock"

log = logging.getLogger("hybrid_distill_jax")
_held: dict[str, int] = {}  # workdir (real path) -> the descriptor holding its lock, for life


def check_workdir(workdir: str) -> str:
    """Creates the workdir, proves it is writable and locks it for this run (``hold``) before any
    training starts; returns its absolute path."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: not writable ({e.strerror})") from None
    hold(workdir)
    return workdir


def hold(workdir: str) -> None:
    """Locks ``workdir`` for this process (process 0 of a multi-host run); ConfigError if a live run has
    it."""
    import jax

    key = os.path.realpath(workdir)
    if key in _held or jax.process_index() != 0:
        return
    path = os.path.join(key, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot create its lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a run that is starting"
        os.close(fd)
        raise ConfigError(
            f"--workdir={workdir}: in use by another run ({holder}); wait for it to end or use another "
            "workdir"
        ) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: this file system has no locks
        os.close(fd)
        log.warning("--workdir=%s: cannot be locked (%s); two runs there would not be stopped", workdir, e)
        return
    _held[key] = fd
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n".encode(), 0)
    except OSError:  # a full disk: the lock holds, only the holder goes unnamed
        pass


def release(workdir: str) -> None:
    """Gives up this process's lock on ``workdir`` (a finished run: another process may now use it)."""
    fd = _held.pop(os.path.realpath(workdir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock

"""SIGTERM, SIGINT and SIGHUP at any moment, in every phase: stop within seconds, exit 75 (SIGTERM: rerun to
resume), 130 (SIGINT) or 129 (SIGHUP), and keep everything already written.

``install()`` (the first thing ``main`` does) records the signal and wakes a watchdog thread, even while the
main thread is blocked inside TensorFlow or XLA (``signal.set_wakeup_fd``). What happens next depends on
whether training progress exists that no checkpoint holds yet (``set_unsaved_progress``, kept by the trainer
from its first completed step until its last checkpoint is on disk):

* none (start-up, data preparation, the first compilation, export, evaluation, between the stages of a
  demo or study): the watchdog ends the process at once with the signal's status, naming the phase
  (``enter``), and no further phase starts meanwhile. Nothing is lost: checkpoints, exports, ``eval.json``
  and the stages' results are written whole or not at all (``errors.write_atomically``, orbax's renames),
  as a SIGKILL at any moment already requires; an evaluation cut short writes nothing, and a rerun
  evaluates again.
* some: the trainer sees ``requested()`` at its next step boundary, checkpoints, and raises ``Preempted``.
  If it has not reached a boundary (``acknowledge()``) within ``GRACE_S`` seconds (a long recompilation),
  the watchdog exits anyway and the run resumes from the previous checkpoint. A checkpoint being written
  after ``acknowledge()`` is never cut short. A second signal exits at once.

The statuses say who stopped the run. 75 (EX_TEMPFAIL) is the system's "try again later": a scheduler's or
a TPU host's preemption, which restart loops (``launch/tpu_worker.sh``, a SLURM requeue) resume
automatically. SIGINT (Ctrl-C) and SIGHUP (the terminal or SSH session that started the run went away)
are 128 + the signal's number, the status a shell reports for a process the signal ended: nobody asked
for a retry, so nothing restarts them on its own, and rerunning the command resumes them like any other.
A signal ignored when the process starts (``nohup`` ignores SIGHUP) stays ignored.

The handlers never raise: an exception thrown into the middle of TensorFlow or XLA initialisation can
crash the interpreter (a Ctrl-C during start-up used to end in a segmentation fault).

A trainer or an experiment chain run as a library (a notebook, a script) handles ``LIBRARY_SIGNALS`` for
as long as it runs (``handling``), so that Ctrl-C stays a KeyboardInterrupt. Multi-process runs:
``jax.distributed`` installs its own SIGTERM notifier, and the trainer stops at the step that every process
agrees on (``multihost_utils.reached_preemption_sync_point``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time

from hybrid_distill_jax.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The signals whose default action ends a process without a word; SIGINT is Python's KeyboardInterrupt.
LIBRARY_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
GRACE_S = 20.0
# Every phase a run passes through (``enter``), as its exit line names it; config.faults.pause_at can hold
# a run at any of them (tests send signals there).
PHASES = {
    "startup": "start-up",
    "data": "data preparation",
    "compile": "the first compilation",
    "train": "training",
    "recompile": "a later stage's compilation",
    "export": "the export",
    "eval": "the final evaluation",
    "stage": "a demo or study stage",
}

_lock = threading.Lock()
_requested: int | None = None
_unsaved = False
_acknowledged = False
_arrived = threading.Event()  # set by the first signal (ends a fault-injection pause early)
_installed: dict | None = None
_phase = "startup"
_paused: set[str] = set()  # the phases a fault-injection pause has held this process at


def install(handled: tuple[int, ...] = SIGNALS) -> bool:
    """Handles ``handled`` (SIGTERM, SIGINT, SIGHUP) from now on, except those ignored (``nohup``); False
    (and nothing done) if already installed or off the main thread (where Python cannot install
    handlers)."""
    global _installed
    if _installed is not None or threading.current_thread() is not threading.main_thread():
        return False
    handled = tuple(s for s in handled if signal.getsignal(s) is not signal.SIG_IGN)
    _reset()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {s: signal.signal(s, _record) for s in handled}
    watchdog = threading.Thread(target=_watch, args=(read_fd, handled), name="signal-watchdog", daemon=True)
    _installed = dict(previous=previous, previous_fd=previous_fd, write_fd=write_fd, watchdog=watchdog)
    watchdog.start()
    return True


def uninstall() -> None:
    """Restores the handlers ``install`` replaced and stops the watchdog."""
    global _installed
    if _installed is None:
        return
    installed, _installed = _installed, None
    signal.set_wakeup_fd(installed["previous_fd"])
    for s, handler in installed["previous"].items():
        signal.signal(s, handler)
    os.close(installed["write_fd"])  # the watchdog reads end-of-file and returns
    installed["watchdog"].join(timeout=5)
    _reset()


@contextlib.contextmanager
def handling():
    """``LIBRARY_SIGNALS`` handled inside the block (or the decorated function) unless handlers are
    installed already, as ``main`` installs them all first: the library entry points (``train``, the
    experiment chains) answer them in every phase, as the command line does."""
    installed = install(LIBRARY_SIGNALS)
    try:
        yield
    finally:
        if installed:
            uninstall()


def _reset() -> None:
    global _requested, _unsaved, _acknowledged
    _requested, _unsaved, _acknowledged = None, False, False
    _arrived.clear()


def requested() -> int | None:
    """The signal received (SIGTERM, SIGINT or SIGHUP), or None."""
    return _requested


def set_unsaved_progress(unsaved: bool) -> None:
    """Whether training steps completed that no checkpoint on disk holds yet (see the module docstring)."""
    global _unsaved
    _unsaved = unsaved


def acknowledge() -> None:
    """The trainer has seen the request and is writing its last checkpoint: the watchdog leaves it be."""
    global _acknowledged
    _acknowledged = True


def enter(config, phase: str) -> None:
    """The run is now in ``phase`` (``PHASES``), which a signal's exit line names. Once a signal has come
    that the watchdog answers by ending the process, no phase starts (nor writes anything) meanwhile.

    Test hook: ``config.faults.pause_at == phase`` holds the run there for ``faults.pause_s`` seconds (or
    until a signal arrives) the first time it enters that phase, announced on stderr so that a test knows
    when to send a signal."""
    global _phase
    if not _ending():
        _phase = phase
        faults = config.get("faults") or {}
        if faults.get("pause_at", "") == phase and phase not in _paused:
            _paused.add(phase)
            print(f"fault injection: pausing at {phase}", file=sys.stderr, flush=True)
            _arrived.wait(faults.get("pause_s", 0.0))
    if _ending():
        time.sleep(GRACE_S)  # the watchdog exits within its next poll


def _ending() -> bool:
    """A signal came, and no checkpoint is due: the watchdog is ending the process."""
    return _requested is not None and not _unsaved and not _acknowledged


def _record(signum, frame) -> None:
    """The Python-level handler (main thread, between bytecodes): only records the request."""
    del frame
    _note(signum)


def _note(signum: int) -> None:
    global _requested
    with _lock:
        if _requested is None:
            _requested = signum
    _arrived.set()


def _watch(read_fd: int, handled: tuple[int, ...]) -> None:
    """Woken by every signal's byte on the wakeup pipe; ends the process when the main thread cannot."""
    received = 0
    deadline = None
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], 0.2)
            if ready:
                data = os.read(read_fd, 64)
                if not data:
                    return  # uninstalled
                for signum in (b for b in data if b in handled):  # the fd also gets others' signals
                    received += 1
                    _note(signum)
                    if received > 1:
                        _exit(signum, "a second signal: stopping at once")
                    if _unsaved and not _acknowledged:
                        name, phase = signal.Signals(signum).name, PHASES[_phase]
                        _say(f"{name} during {phase}: checkpointing at the next step boundary, then exiting")
                        deadline = time.monotonic() + GRACE_S
            if _requested is None or _acknowledged:
                continue
            if _ending():
                _exit(_requested, "no training progress to checkpoint since the last checkpoint")
            if deadline is not None and time.monotonic() > deadline:
                _exit(
                    _requested, f"no step boundary reached within {GRACE_S:.0f} s; the last checkpoint stands"
                )
    finally:
        os.close(read_fd)


def _say(message: str) -> None:
    os.write(2, f"hybrid_distill_jax: {message}\n".encode())


def _exit(signum: int, reason: str) -> None:
    """Ends the process now (no interpreter shutdown, which TensorFlow/XLA mid-initialisation can crash)."""
    status = Preempted.exit_status(signum)
    name = signal.Signals(signum).name
    _say(f"{name} during {PHASES[_phase]}: {reason}; exiting with status {status}")
    os._exit(status)

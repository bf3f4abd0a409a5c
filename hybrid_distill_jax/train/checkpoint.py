"""Training checkpoints through orbax: the whole train state plus a small JSON of run metadata.

Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint
half-written at the moment of a kill is never listed as a step and resuming picks the last complete one.

Writes run in orbax's background threads. A failed write (a full disk) reaches the main thread at the next
save or at ``close``, as one CheckpointError naming the step, the directory and the space left there; the
threads' own reports of it (tracebacks logged by orbax, tensorstore's callbacks into the event loop orbax
closed) are silenced (``_silence_background_reports``), since the same failure is reported by the caller.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp

from hybrid_distill_jax.errors import CheckpointError, free_space

log = logging.getLogger("hybrid_distill_jax")


class Checkpointer:
    """Saves every ``every`` steps (and on request), keeps the newest ``keep``, restores the latest."""

    def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._unreadable: set[int] = set()  # steps whose restore failed: a new save replaces them
        self._writing: int | None = None  # the step being written in the background
        _silence_background_reports()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts writing step ``step`` (in the background). A failed write (disk full, permissions), this
        one's or the previous one's, raises CheckpointError naming it.

        Earlier checkpoints are untouched by a failed write: orbax only renames a finished temporary
        directory into place, and the failed one's temporary directory is removed.
        """
        if step in self._unreadable:  # damaged, and skipped at restore: replace it rather than keep it
            self._manager.delete(step)
            self._unreadable.discard(step)
        elif step in self._manager.all_steps():
            return
        self.wait()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # OSError, or tensorstore's ValueError: RESOURCE_EXHAUSTED
            raise self._write_error(step, e) from None
        self._writing = step

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores into the shapes, dtypes and shardings of ``abstract_state``."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax raises bare Exception for unreadable array data (tensorstore)
            self._unreadable.add(step)
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} is damaged, incomplete or does not fit this run's model "
                f"and optimizer (was the config changed?): {_innermost_reason(e)}"
            ) from None
        meta = restored["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            self._unreadable.add(step)
            raise CheckpointError(
                f"checkpoint {self.directory}/{step}: meta/metadata is not this checkpoint's description "
                f"(got {str(meta)[:100]})"
            )
        return restored["state"], dict(meta)

    def wait(self) -> None:
        """Waits for the write in flight; CheckpointError if it failed."""
        step, self._writing = self._writing, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from None

    def close(self) -> None:
        """Waits for the write in flight (CheckpointError if it failed) and ends orbax's threads."""
        try:
            self.wait()
        finally:
            self.close_quietly()

    def close_quietly(self) -> None:
        """``close`` on the way out of a failed run, whose error is the one to report: a write in flight is
        still waited for (it may be the last good checkpoint); its failure is logged in one line."""
        try:
            self.wait()
        except CheckpointError as e:
            log.error("%s", e)
        try:
            self._manager.close()
        except Exception:  # the failed write seen again: wait() has reported it
            pass

    def _write_error(self, step: int, e: BaseException) -> CheckpointError:
        """The one-line error of a failed write of ``step``; removes what the write left behind."""
        space = free_space(self.directory)
        for partial in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)
        return CheckpointError(
            f"could not write checkpoint {step} to {self.directory}: {_write_reason(e)} ({space}); earlier "
            "checkpoints are intact"
        )


def _write_reason(e: BaseException) -> str:
    """Why a write failed, in the system's words (tensorstore's errors carry the errno in their text)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='(\d+)'", str(e))
    return os.strerror(int(code.group(1))) if code else _innermost_reason(e)


class _ReportedByTheCaller(logging.Filter):
    """Drops logged tracebacks of orbax's background work: orbax logs an exception in its writer threads
    (absl) and re-raises it to the thread that waits for the save (``Checkpointer.wait``), where it is
    reported; the other writes of a failed save fail alike and end as futures never retrieved (asyncio)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[2] is None:
            return True
        files = [record.pathname] + [frame.filename for frame in traceback.extract_tb(record.exc_info[2])]
        return not any(f"{os.sep}orbax{os.sep}" in name for name in files)


_silenced = False


def _silence_background_reports() -> None:
    """Once per process: orbax's logged tracebacks (``_ReportedByTheCaller``), and tensorstore's 'Event
    loop is closed' from writes of a failed save that complete after orbax closed its event loop (the
    save has failed already; nothing more is lost)."""
    global _silenced
    if _silenced:
        return
    _silenced = True
    for logger in ("absl", "asyncio"):
        logging.getLogger(logger).addFilter(_ReportedByTheCaller())
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        late = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
            "Event loop is closed"
        )
        if not late:
            previous(unraisable)

    sys.unraisablehook = hook


def _innermost_reason(e: BaseException) -> str:
    """The first line of the deepest cause of ``e``: the file-level reason, not the wrapper's."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete tree, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

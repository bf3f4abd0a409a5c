"""Training checkpoints through orbax: the whole train state plus a small JSON of run metadata.

Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint
half-written at the moment of a kill is never listed as a step and resuming picks the last complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hybrid_distill_jax.errors import CheckpointError


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

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes step ``step``; a failed write (disk full, permissions) raises CheckpointError naming it.

        Earlier checkpoints are untouched by a failed write: orbax only renames a finished temporary
        directory into place.
        """
        if step in self._unreadable:  # damaged, and skipped at restore: replace it rather than keep it
            self._manager.delete(step)
            self._unreadable.discard(step)
        elif step in self._manager.all_steps():
            return
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except OSError as e:
            raise CheckpointError(
                f"could not write checkpoint {step} to {self.directory}: {e.strerror or e}; earlier "
                "checkpoints are intact"
            ) from None

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _innermost_reason(e: BaseException) -> str:
    """The first line of the deepest cause of ``e``: the file-level reason, not the wrapper's."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete tree, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

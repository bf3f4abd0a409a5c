"""Training tasks, one per ``config.mode``: importing this package imports every module in it, and each
task registers itself (``base.register``). A new training mode is one new file here."""

from hybrid_distill_jax.registry import import_submodules
from hybrid_distill_jax.tasks.base import TASKS, Task, build_task, register

import_submodules(__name__, __path__)

__all__ = ["TASKS", "Task", "build_task", "register"]

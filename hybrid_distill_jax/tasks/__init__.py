"""Training tasks, one per ``config.mode``: importing this package registers all of them."""

from hybrid_distill_jax.tasks import distill, finetune, mae, supervised  # noqa: F401  (registration)
from hybrid_distill_jax.tasks.base import TASKS, Task, build_task, register

__all__ = ["TASKS", "Task", "build_task", "register"]

"""The Task interface the trainer runs, and the registry that maps ``config.mode`` to a task.

A task owns the models of one training mode: it initialises the trained parameters, computes the loss
of a batch, and says which ViT it trains (``vit``) so that evaluation, diagnostics and export work the
same for every mode. Adding a mode = a subclass here in ``tasks/`` decorated with ``@register``.

The trainer calls, per run: ``init_params``, ``pretrained_params`` (fresh runs only),
``make_optimizer``; per step: ``stage`` (a hashable, static value: one compilation per distinct value)
and, inside the jitted step, ``loss_fn``; per report: ``stage_metrics``; at the end: ``export``,
``feature_fn`` (frozen-feature probes) and ``final_metrics``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

import jax
import ml_collections

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.build import check_model_config, model_defaults, normalize, pooled_features
from hybrid_distill_jax.models.vit import VisionTransformer
from hybrid_distill_jax.optim import make_optimizer

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: makes ``cls`` the task of ``config.mode == cls.name``."""
    TASKS[cls.name] = cls
    return cls


def build_task(config, num_classes: int, *, abstract: bool = False, platform: str | None = None) -> Task:
    """The task of ``config.mode``, with its models built and frozen teachers loaded.

    ``abstract``: the teachers are described, not loaded (``frozen`` holds ShapeDtypeStructs, nothing is
    read beyond each ``model.json``, nothing downloaded): enough to compile the step for other hardware.
    ``platform`` ('cpu', 'gpu', 'tpu'; default JAX's) is the hardware the step is built for.
    """
    if config.mode not in TASKS:
        raise ConfigError(f"config.mode={config.mode!r}: no training task; expected one of {sorted(TASKS)}")
    return TASKS[config.mode](config, num_classes, abstract=abstract, platform=platform)


class Task:
    """Base class: the required methods raise, the hooks have the defaults most modes want."""

    name: ClassVar[str]
    # The ``loss_fn`` metric that carries a batch's contribution to the task's statistics (``init_stats``).
    STATS_KEY: ClassVar[str] = "stats"
    vit: VisionTransformer  # the ViT this task trains, evaluates and exports
    mean: tuple  # its input normalisation
    std: tuple
    frozen: dict  # arrays the step reads and never updates (the teachers' parameters)
    platform: str  # what the step is built for: 'cpu', 'gpu' or 'tpu'

    def __init__(self, config, num_classes: int, *, abstract: bool = False, platform: str | None = None):
        self.config = config
        self.platform = platform or jax.default_backend()
        self.num_classes = num_classes
        self.abstract = abstract
        self.image_size = config.image_size
        self.frozen = {}

    # -- configuration -------------------------------------------------------------------------------
    @staticmethod
    def add_defaults(c: ml_collections.ConfigDict) -> None:
        """Adds this mode's sections and changes to the shared defaults (``config_lib.base_config``)."""

    @staticmethod
    def check_config(config, *, check_teachers: bool = True, deviceless: bool = False) -> None:
        """This mode's up-front checks (after ``config_lib.validate``'s shared ones); a one-line
        ConfigError naming the field. ``deviceless``: models are described, never downloaded."""

    # -- required ------------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Any:
        """The trained parameters (a pytree), freshly initialised."""
        raise NotImplementedError

    def loss_fn(self, params, frozen, batch: dict, rng: jax.Array, stage: Hashable, stats=None, step=None):
        """(scalar loss, {name: scalar}) of one batch; runs inside the jitted, differentiated step. A
        task that keeps statistics (``init_stats``) is also given them and the step number (0-based),
        and returns the batch's moments for ``update_stats`` as ``metrics[STATS_KEY]``."""
        raise NotImplementedError

    # -- hooks ---------------------------------------------------------------------------------------
    def init_stats(self) -> Any | None:
        """Statistics the step keeps beside the parameters, never trained (a pytree in the train state,
        checkpointed and replicated), or None when the task keeps none."""
        return None

    def update_stats(self, stats, moments, step: jax.Array):
        """``stats`` after step ``step``, given the batch's ``metrics[STATS_KEY]`` (averaged over
        micro-batches)."""
        return stats

    @property
    def estimation_batches(self) -> int:
        """How many training batches ``estimate_stats`` reads before a fresh run's first step (0: none)."""
        return 0

    def estimate_stats(self, frozen, stats, batches):
        """Statistics estimated from the first training ``batches`` (on the devices), before step 0."""
        return stats

    def vit_params(self, params) -> Any:
        """The part of the trained parameters that belongs to ``vit``."""
        return params

    def stage(self, step: int, total_steps: int) -> Hashable:
        """The static part of step ``step`` (shapes it fixes); one compilation per distinct value."""
        return None

    def stage_metrics(self, stage: Hashable) -> dict[str, float]:
        """Scalars that describe ``stage`` in the logs (e.g. the kept-token count)."""
        return {}

    def stages(self, total_steps: int) -> tuple[Hashable, ...]:
        """Every distinct ``stage`` of a run of ``total_steps`` steps, in order."""
        return (self.stage(0, total_steps),)

    def flops_per_example(self, stage: Hashable) -> dict[str, float] | None:
        """Analytic matmul FLOPs of one training example in ``stage``, by part and ``total``; None when
        the task does not count them."""
        return None

    def make_optimizer(self, optim_cfg, batch_size: int, total_steps: int, warmup_steps: int):
        """(optax transformation, learning-rate schedule)."""
        return make_optimizer(optim_cfg, batch_size, total_steps, warmup_steps)

    def pretrained_params(self, params) -> Any:
        """Fresh ``params`` with loaded weights put in, for a run that starts from a checkpoint."""
        return params

    def final_metrics(self, params) -> dict[str, float]:
        """Task-specific end-of-run metrics, beside the frozen-feature probes."""
        return {}

    def feature_fn(self, params, images: jax.Array) -> jax.Array:
        """Pooled features [B, D] of ``vit`` for [0, 1] images (what the k-NN and linear probes read)."""
        out = self.vit.apply(
            {"params": self.vit_params(params)}, normalize(images, self.mean, self.std, self.image_size)
        )
        return pooled_features(out, self.config.eval.pool, self.vit.num_prefix)

    def export_metadata(self) -> dict:
        return {"trained_by": f"hybrid_distill_jax {self.name}"}

    def export(self, params, directory: str, stats=None) -> str:
        """Writes ``vit`` as a model directory (``model.json`` + ``params.msgpack``); ``stats``: the train
        state's (``init_stats``), for tasks that export them."""
        return model_io.save_model(
            directory,
            self.vit,
            self.vit_params(params),
            mean=self.mean,
            std=self.std,
            extra=self.export_metadata(),
        )


def model_section(**changes) -> ml_collections.ConfigDict:
    """The ``model`` section of the single-model modes: a ViT's fields and its pooling."""
    return ml_collections.ConfigDict({**model_defaults(), "pool": "cls", **changes})


def loss_section() -> ml_collections.ConfigDict:
    """The ``loss`` section of the classifying modes (supervised, finetune)."""
    return ml_collections.ConfigDict(dict(label_smoothing=0.1))


def check_loss_section(config) -> None:
    checks.check_ranges(config.loss, {"label_smoothing": checks.UNIT}, prefix="loss.")


def check_model_section(config) -> None:
    """``config.model`` as a ViT trained from scratch at ``config.image_size``."""
    check_model_config(config.model, config.image_size, "model")

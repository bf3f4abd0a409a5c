"""The compiled program of a run, built once for the trainer, the benchmark and the deviceless compile.

``build_program`` turns a config, its task and a mesh into a :class:`StepProgram`: the optimizer, the
train state's shapes and shardings, the frozen teachers' shardings, the batch sharding and the step of
``train.step``. ``program.jitted(stage)`` is the jitted step the trainer runs; ``program.lower(stage)``
lowers the same function on abstract inputs only (shapes, dtypes, shardings), which is all
``hybrid_distill_jax.compile`` needs to compile it for devices this host does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_distill_jax.parallel import sharding
from hybrid_distill_jax.train.step import jit_step, make_init_fn, make_train_step


@dataclasses.dataclass
class StepProgram:
    task: Any
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    init_state: Callable[[jax.Array], dict]  # rng -> a fresh train state (un-jitted)
    abstract_state: Any  # its ShapeDtypeStructs
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: NamedSharding
    step: Callable  # (state, frozen, batch, stage) -> (state, metrics), un-jitted
    global_batch: int
    image_size: int

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def jitted(self, stage: Hashable, step: Callable | None = None) -> Callable:
        """The step (or ``step``, a wrapper of it with the same signature) jitted for ``stage``."""
        return jit_step(
            step or self.step,
            stage,
            state_shardings=self.state_shardings,
            frozen_shardings=self.frozen_shardings,
            batch_sharding=self.batch_sharding,
            metrics_sharding=self.replicated,
        )

    def jitted_init(self) -> Callable:
        """``init_state`` jitted to create the state already sharded."""
        return jax.jit(self.init_state, out_shardings=self.state_shardings)

    def batch_shapes(self) -> dict:
        """The global batch the step takes, as the input pipelines ship it (uint8 images, int32 labels)."""
        size = self.image_size
        return {
            "image": jax.ShapeDtypeStruct((self.global_batch, size, size, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((self.global_batch,), jnp.int32),
        }

    def abstract_inputs(self, frozen: Any) -> tuple:
        """(state, frozen, batch) as ShapeDtypeStructs carrying their shardings."""
        with_sharding = lambda tree, shardings: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )
        batch_shardings = jax.tree.map(lambda _: self.batch_sharding, self.batch_shapes())
        return (
            with_sharding(self.abstract_state, self.state_shardings),
            with_sharding(frozen, self.frozen_shardings),
            with_sharding(self.batch_shapes(), batch_shardings),
        )

    def lower(self, stage: Hashable):
        """The step of ``stage`` lowered on abstract inputs (the teachers as ``task.frozen`` describes
        them): ``.compile()`` it for the mesh's devices, whatever they are."""
        return self.jitted(stage).lower(*self.abstract_inputs(self.task.frozen))


def build_program(
    config,
    task,
    mesh: jax.sharding.Mesh,
    *,
    total_steps: int,
    warmup_steps: int,
    nan_at_step: int = -1,
) -> StepProgram:
    """The step of ``task`` under ``config``'s optimizer, sharding rules and gradient accumulation."""
    tx, lr_schedule = task.make_optimizer(config.optim, config.batch_size, total_steps, warmup_steps)
    ema = (float(config.ema.decay), int(config.ema.warmup_steps))
    init_state = make_init_fn(task, tx, ema=ema[0] > 0)
    abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
    step = make_train_step(
        task,
        tx,
        lr_schedule,
        grad_accum_steps=config.get("grad_accum_steps", 1),
        mesh=mesh,
        nan_at_step=nan_at_step,
        ema=ema,
    )
    return StepProgram(
        task=task,
        mesh=mesh,
        tx=tx,
        lr_schedule=lr_schedule,
        init_state=init_state,
        abstract_state=abstract_state,
        state_shardings=sharding.state_shardings(abstract_state, mesh, config.sharding),
        frozen_shardings=sharding.teacher_shardings(task.frozen, mesh, config.sharding),
        batch_sharding=sharding.batch_sharding(mesh),
        step=step,
        global_batch=config.batch_size,
        image_size=config.image_size,
    )


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled (per-device) module, where the back end has a cost model (not
    CUDA); a loop body (gradient accumulation) is counted once."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- back ends without a cost model raise or return nothing
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") else None

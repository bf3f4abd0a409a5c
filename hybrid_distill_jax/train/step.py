"""One training step, shared by the trainer and the benchmark.

``make_init_fn`` builds the train state of a task; ``make_train_step`` returns the pure function
``step(state, frozen, batch, stage) -> (state, metrics)`` that ``jit_step`` compiles once per stage
(``stage`` fixes the static shapes, e.g. the kept-token count). The step draws its RNG from the state,
computes the task's loss and gradients (accumulated over micro-batches when asked), skips updates with
a non-finite loss or gradient (counted in the state), applies the optax update, moves the task's
statistics (``Task.update_stats``) and, when the run keeps one, the parameters' EMA (``ema_decay``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.parallel.sharding import BATCH_AXES


def make_init_fn(task, tx: optax.GradientTransformation, ema: bool = False) -> Callable[[jax.Array], dict]:
    """``init(rng) -> state``: step, params, optimizer state, RNG and the non-finite counters; with
    ``ema``, an fp32 copy of the params that the step averages (``ema``); the task's statistics
    (``stats``), if it keeps any."""

    def init(rng):
        params = task.init_params(rng)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
            "nonfinite": jnp.zeros((), jnp.int32),  # steps skipped for a NaN/Inf loss or gradient
            "first_nonfinite": jnp.full((), -1, jnp.int32),
        }
        if ema:
            state["ema"] = ema_of(params)
        stats = task.init_stats()
        if stats is not None:
            state["stats"] = stats
        return state

    return init


def ema_of(params: Any) -> Any:
    """The EMA's starting point: the parameters themselves, in fp32."""
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_decay(step: jax.Array, decay: float, warmup_steps: int) -> jax.Array:
    """The EMA decay after ``step`` updates: ``decay``, ramped linearly from 0 over ``warmup_steps``."""
    if not warmup_steps:
        return jnp.float32(decay)
    return jnp.float32(decay) * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def make_train_step(
    task,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    mesh: jax.sharding.Mesh | None = None,
    nan_at_step: int = -1,
    ema: tuple[float, int] = (0.0, 0),
) -> Callable:
    """The un-jitted step ``(state, frozen, batch, stage) -> (state, metrics)`` of ``task``.

    ``nan_at_step >= 0`` poisons that step's gradients (fault injection for the tests of the guard).
    ``ema`` = (decay, warmup steps): how a state's ``ema`` follows the updated params (``ema_decay``).
    """

    def step(state, frozen, batch, stage: Hashable):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        stats = {"stats": state["stats"], "step": state["step"]} if "stats" in state else {}
        (loss, metrics), grads = accumulate_gradients(
            lambda params, b, r: grad_fn(params, frozen, b, r, stage, **stats),
            state["params"],
            batch,
            rng,
            grad_accum_steps,
            mesh,
        )
        if nan_at_step >= 0:
            poison = jnp.where(state["step"] == nan_at_step, jnp.nan, 0.0)
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite step leaves params and optimizer state as they were (both policies skip it on
        # device; 'stop' then ends the run on the host at the next report).
        keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        nonfinite = state["nonfinite"] + (~finite).astype(jnp.int32)
        first_nonfinite = jnp.where(
            (state["first_nonfinite"] < 0) & ~finite, state["step"] + 1, state["first_nonfinite"]
        )
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=keep_old(params, state["params"]),
            opt_state=keep_old(opt_state, state["opt_state"]),
            nonfinite=nonfinite,
            first_nonfinite=first_nonfinite,
        )
        if "stats" in state:
            updated = task.update_stats(state["stats"], metrics.pop(task.STATS_KEY), state["step"])
            new_state["stats"] = keep_old(updated, state["stats"])
        if "ema" in state:
            d = ema_decay(state["step"] + 1, *ema)
            averaged = jax.tree.map(
                lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), state["ema"], new_state["params"]
            )
            new_state["ema"] = keep_old(averaged, state["ema"])
        metrics = dict(
            metrics,
            grad_norm=grad_norm,
            lr=lr_schedule(state["step"]),
            nonfinite_steps=nonfinite,
            first_nonfinite=first_nonfinite,
        )
        return new_state, metrics

    return step


def jit_step(
    step: Callable,
    stage: Hashable,
    *,
    state_shardings: Any,
    frozen_shardings: Any,
    batch_sharding: NamedSharding,
    metrics_sharding: NamedSharding,
) -> Callable:
    """``step`` specialised to ``stage`` and jitted with its shardings; the input state is donated.

    Every input stays an argument even where the stage reads none of it (a teacher's blocks after the
    last distilled layer): those arrays live on the devices all the same, so the compiled program's
    memory counts them.
    """
    return jax.jit(
        lambda state, frozen, batch: step(state, frozen, batch, stage),
        in_shardings=(state_shardings, frozen_shardings, batch_sharding),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=(0,),
        keep_unused=True,
    )


def accumulate_gradients(
    grad_fn: Callable,
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    steps: int,
    mesh: jax.sharding.Mesh | None = None,
):
    """``grad_fn(params, batch, rng) -> ((loss, metrics), grads)`` averaged over ``steps`` micro-batches.

    Micro-batch ``i`` takes examples ``i, i + steps, i + 2*steps, ...`` so every device keeps working
    on its own rows (no resharding); ``jax.lax.scan`` runs them one after another, summing in fp32. For
    losses that are means over equally sized micro-batches this equals one step on the whole batch
    (up to float rounding and the per-micro-batch random streams ``fold_in(rng, i)``).
    """
    if steps == 1:
        return grad_fn(params, batch, rng)

    def split(x):
        b = x.shape[0]
        if b % steps:
            raise ConfigError(f"batch of {b} examples is not divisible by grad_accum_steps={steps}")
        x = jnp.swapaxes(x.reshape(b // steps, steps, *x.shape[1:]), 0, 1)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
        return x

    micro = jax.tree.map(split, dict(batch))
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

    def body(acc, xs):
        i, mb = xs
        out = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(lambda a, o: a + o.astype(jnp.float32), acc, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
    return jax.tree.map(lambda t, s: (t / steps).astype(s.dtype), total, shapes)

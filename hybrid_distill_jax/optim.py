"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask; the schedule's
length in steps (``resolve_steps``)."""

from __future__ import annotations

import math

import jax
import optax

# Parameter names that never get weight decay, whatever their rank (embeddings and tokens).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "mask_token")


def decay_mask(params):
    """True where weight decay applies: matrices and conv kernels, not norms, biases or embeddings."""

    def keep(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        return leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate(optim_cfg, batch_size: int) -> float:
    """``optim.lr`` if set, else ``optim.base_lr * batch_size / 256`` (the MAE scaling rule)."""
    return optim_cfg.lr if optim_cfg.get("lr") else optim_cfg.base_lr * batch_size / 256


def schedule(optim_cfg, batch_size: int, total_steps: int, warmup_steps: int) -> optax.Schedule:
    peak = learning_rate(optim_cfg, batch_size)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=min(optim_cfg.min_lr, peak),
    )


def make_optimizer(optim_cfg, batch_size: int, total_steps: int, warmup_steps: int, extra=()):
    """Returns (optax transformation, schedule); ``extra`` transformations run after AdamW."""
    sched = schedule(optim_cfg, batch_size, total_steps, warmup_steps)
    parts = []
    if optim_cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(
        optax.adamw(
            sched,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=1e-8,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        )
    )
    parts.extend(extra)
    return optax.chain(*parts), sched


def resolve_steps(config, num_train_examples: int) -> tuple[int, int, int]:
    """(total_steps, warmup_steps, steps_per_epoch) from the step or epoch settings."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
    warmup = config.optim.warmup_steps or int(round(config.optim.warmup_epochs * steps_per_epoch))
    return total, min(warmup, total), steps_per_epoch

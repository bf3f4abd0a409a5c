"""Progressive redundant token masking.

The teacher's CLS->patch attention scores each patch: patches it barely attends to are redundant.
The student keeps K patches sampled without replacement with probability proportional to the score
(Gumbel-top-k), or the top K, or K uniformly at random. K is a Python int per stage so every shape
stays static under ``jit``: the step compiles once per stage.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hybrid_distill_jax.errors import ConfigError

SELECTIONS = ("gumbel", "topk", "random")
MODES = ("over_training", "over_depth")
SCORE_SOURCES = ("feature_teacher", "relation_teacher", "uniform")


def redundancy_scores(cls_attn: jax.Array) -> jax.Array:
    """CLS->patch attention [B, H, N] averaged over heads -> importance score [B, N] (fp32)."""
    return jnp.mean(cls_attn.astype(jnp.float32), axis=1)


def select_tokens(
    rng: jax.Array, scores: jax.Array, k: int, method: str = "gumbel", temperature: float = 1.0
) -> jax.Array:
    """Indices [B, k] (ascending) of the kept patches out of scores [B, N].

    ``gumbel``: top-k of log(score)/tau + Gumbel noise, i.e. sampling without replacement with
    probabilities proportional to score^(1/tau). ``topk``: the k highest scores. ``random``: uniform.
    """
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ConfigError(f"cannot keep {k} of {n} patch tokens")
    if k == n:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), scores.shape)
    if method == "gumbel":
        keys = jnp.log(jnp.maximum(scores.astype(jnp.float32), 1e-12)) / temperature
        keys = keys + jax.random.gumbel(rng, scores.shape, jnp.float32)
    elif method == "topk":
        keys = scores.astype(jnp.float32)
    elif method == "random":
        keys = jax.random.uniform(rng, scores.shape, jnp.float32)
    else:
        raise ConfigError(f"masking.selection={method!r}: expected one of {SELECTIONS}")
    _, idx = jax.lax.top_k(keys, k)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def with_prefix(patch_indices: jax.Array, num_prefix: int) -> jax.Array:
    """Token indices (prefix tokens first) of a sequence holding the prefix tokens and these patches."""
    b = patch_indices.shape[0]
    prefix = jnp.broadcast_to(jnp.arange(num_prefix, dtype=jnp.int32), (b, num_prefix))
    return jnp.concatenate([prefix, patch_indices + num_prefix], axis=1)


@dataclasses.dataclass(frozen=True)
class KeepSchedule:
    """Piecewise-constant mask ratio over training: ``ratios[i]`` from fraction ``starts[i]`` of the steps."""

    starts: tuple[float, ...]
    ratios: tuple[float, ...]

    def __post_init__(self):
        if len(self.starts) != len(self.ratios) or not self.starts:
            raise ConfigError(
                "masking.stage_starts and masking.stage_ratios must be non-empty and of equal length"
            )
        if self.starts[0] != 0.0 or list(self.starts) != sorted(self.starts) or self.starts[-1] >= 1.0:
            raise ConfigError(
                f"masking.stage_starts={list(self.starts)}: must start at 0.0, increase, and stay below 1.0"
            )
        for r in self.ratios:
            if not 0.0 <= r < 1.0:
                raise ConfigError(
                    f"masking.stage_ratios={list(self.ratios)}: each mask ratio must lie in [0, 1)"
                )

    def stage(self, step: int, total_steps: int) -> int:
        frac = step / max(total_steps, 1)
        return max(i for i, s in enumerate(self.starts) if s <= frac + 1e-12)

    def stage_start_step(self, stage: int, total_steps: int) -> int:
        return math.ceil(self.starts[stage] * total_steps - 1e-9)

    def mask_ratio(self, step: int, total_steps: int) -> float:
        return self.ratios[self.stage(step, total_steps)]


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Number of kept patches for a mask ratio (at least one)."""
    return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def nested_selection(
    rng: jax.Array,
    scores_per_drop: Sequence[jax.Array],
    counts: Sequence[int],
    method: str,
    temperature: float = 1.0,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """EViT-style drops inside the network: successive subsets of the previous kept set.

    ``scores_per_drop[i]`` [B, N] scores all patches (the teacher's CLS attention at that drop's layer);
    ``counts`` decrease. Returns (relative indices into the previous set, absolute patch indices) per drop.
    """
    b, n = scores_per_drop[0].shape
    current = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    relative, absolute = [], []
    for i, (scores, k) in enumerate(zip(scores_per_drop, counts)):
        sub_scores = jnp.take_along_axis(scores, current, axis=1)
        rel = select_tokens(jax.random.fold_in(rng, i), sub_scores, k, method, temperature)
        current = jnp.take_along_axis(current, rel, axis=1)
        relative.append(rel)
        absolute.append(current)
    return relative, absolute

"""``over_depth`` (EViT-style): every patch enters the student; after chosen blocks, nested subsets stay."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.masking import base


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
        rel = base.select_tokens(jax.random.fold_in(rng, i), sub_scores, k, method, temperature)
        current = jnp.take_along_axis(current, rel, axis=1)
        relative.append(rel)
        absolute.append(current)
    return relative, absolute


@base.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class OverDepthPlan(base.KeepPlan):
    """EViT-style: all patches enter; after block ``drop_layers[i]`` only ``1 - drop_ratios[i]`` stay."""

    mode = "over_depth"
    defaults = dict(drop_layers=(4, 7, 10), drop_ratios=(0.25, 0.4, 0.5))
    ranges = dict(drop_layers=checks.ints(1), drop_ratios=checks.UNIT)

    drop_layers: tuple[int, ...]
    drop_ratios: tuple[float, ...]
    depth: int  # the student's: a drop after its last block would drop nothing it uses

    def __post_init__(self):
        layers = list(self.drop_layers)
        if len(layers) != len(self.drop_ratios) or not layers:
            raise ConfigError("masking.drop_layers and masking.drop_ratios must be non-empty, equal length")
        if layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= self.depth:
            raise ConfigError(
                f"masking.drop_layers={layers}: expected increasing layers in 1..{self.depth - 1}"
            )
        base.check_mask_ratios("masking.drop_ratios", self.drop_ratios, non_decreasing=True)
        base.check_token_multiple(
            self.num_patches, "masking.drop_ratios", self.drop_ratios, self.token_multiple
        )

    @classmethod
    def from_config(cls, mcfg, num_patches: int, depth: int) -> OverDepthPlan:
        return cls(
            drop_layers=tuple(mcfg.drop_layers),
            drop_ratios=tuple(mcfg.drop_ratios),
            depth=depth,
            **cls._common(mcfg, num_patches),
        )

    def stage(self, step: int, total_steps: int) -> tuple[int, ...]:
        return tuple(base.keep_count(self.num_patches, r, self.token_multiple) for r in self.drop_ratios)

    def stage_metrics(self, stage: tuple[int, ...]) -> dict[str, float]:
        return {"keep": stage[-1]}

    def patches_per_block(self, stage: tuple[int, ...], depth: int) -> tuple[int, ...]:
        counts, current = [], self.num_patches
        drops = dict(zip(self.drop_layers, stage))
        for layer in range(1, depth + 1):
            counts.append(current)
            current = drops.get(layer, current)
        return tuple(counts)

    def score_layers(self, teacher_depth: int) -> tuple[int, ...]:
        return self.drop_layers

    def select(self, rng, scores_by_layer, stage: tuple[int, ...]) -> base.KeptTokens:
        scores = [scores_by_layer[layer] for layer in self.drop_layers]
        relative, absolute = nested_selection(rng, scores, stage, self.selection, self.temperature)
        sets = ((1, self._all_patches(scores[0].shape[0])),)
        sets += tuple((layer + 1, idx) for layer, idx in zip(self.drop_layers, absolute))
        return base.KeptTokens(
            input_indices=None, drop_after=dict(zip(self.drop_layers, relative)), sets=sets
        )

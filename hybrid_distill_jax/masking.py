"""Progressive redundant token masking.

A teacher's CLS->patch attention (the teacher ``masking.score_teacher`` names; '' scores every patch
equally) scores each patch: patches it barely attends to are redundant.
The student keeps K patches sampled without replacement with probability proportional to the score
(Gumbel-top-k), or the top K, or K uniformly at random. K is a Python int per stage so every shape
stays static under ``jit``: the step compiles once per stage.

A ``KeepPlan`` per ``masking.mode`` owns the counts and the selection (``keep_plan`` builds it from the
config): ``over_training`` keeps K patches at the student's input, K falling over training;
``over_depth`` drops nested subsets inside the student (EViT). Adding a mode = a ``KeepPlan`` subclass
registered in ``PLANS``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp

from hybrid_distill_jax.errors import ConfigError

SELECTIONS = ("gumbel", "topk", "random")


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


def check_mask_ratios(field: str, ratios, non_decreasing: bool = False) -> None:
    """Each mask ratio in [0, 1) (and non-decreasing for nested drops), else ConfigError naming ``field``."""
    ratios = list(ratios)
    if not all(0.0 <= r < 1.0 for r in ratios) or (non_decreasing and ratios != sorted(ratios)):
        order = "non-decreasing " if non_decreasing else ""
        raise ConfigError(f"{field}={ratios}: expected {order}mask ratios in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MaskRatioSchedule:
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
        check_mask_ratios("masking.stage_ratios", self.ratios)

    def stage(self, step: int, total_steps: int) -> int:
        frac = step / max(total_steps, 1)
        return max(i for i, s in enumerate(self.starts) if s <= frac + 1e-12)

    def mask_ratio(self, step: int, total_steps: int) -> float:
        return self.ratios[self.stage(step, total_steps)]


def keep_count(num_patches: int, mask_ratio: float, token_multiple: int = 1) -> int:
    """Number of kept patches for a mask ratio (at least one). ``token_multiple`` > 1: a masked count is
    lowered until CLS + K is a multiple of it (hardware-friendly sequence lengths); the unmasked count
    (every patch) is kept as it is."""
    k = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    if token_multiple > 1 and k < num_patches:
        k = max((1 + k) // token_multiple * token_multiple - 1, 1)
    return k


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


# -- keep plans: one per masking.mode ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeptTokens:
    """The patches one batch keeps, where. Patch indices count patches only (the CLS token is extra).

    ``input_indices`` [B, K] (or None: all patches) go to the student's ``keep_indices``; ``drop_after``
    {layer: indices into the previous set} (or None) to its ``drop_after``. ``sets`` lists
    (first block that sees it, absolute patch indices [B, K_i]) in order.
    """

    input_indices: jax.Array | None
    drop_after: dict[int, jax.Array] | None
    sets: tuple[tuple[int, jax.Array], ...]

    @property
    def final_indices(self) -> jax.Array:
        """Absolute indices [B, K_final] of the patches among the student's output tokens."""
        return self.sets[-1][1]

    def patches_at(self, layer: int) -> jax.Array:
        """Absolute indices [B, K_l] of the patches block ``layer`` attends over."""
        return [idx for first, idx in self.sets if first <= layer][-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeepPlan:
    """Which patches the student keeps, and how many, for one ``masking.mode``.

    The counts are static per stage (``stage`` is hashable: the step compiles once per stage); the
    selection itself runs inside the jitted step from the scoring teacher's CLS attention.
    """

    num_patches: int
    selection: str = "gumbel"
    temperature: float = 1.0
    token_multiple: int = 1  # masked stages keep K patches with CLS + K a multiple of this (keep_count)

    @classmethod
    def from_config(cls, mcfg, num_patches: int, depth: int) -> KeepPlan:
        """The plan a ``masking`` config section describes, for a student of ``depth`` blocks."""
        raise NotImplementedError

    def stage(self, step: int, total_steps: int) -> Hashable:
        raise NotImplementedError

    def stage_metrics(self, stage: Hashable) -> dict[str, float]:
        """What to log about a stage: the number of patches the student ends with."""
        raise NotImplementedError

    def score_layers(self, teacher_depth: int) -> tuple[int, ...]:
        """The scoring teacher's layers whose CLS attention ``select`` needs."""
        raise NotImplementedError

    def select(self, rng: jax.Array, scores_by_layer: Mapping[int, jax.Array], stage: Hashable) -> KeptTokens:
        """Kept patches from scores [B, N] for each of ``score_layers``."""
        raise NotImplementedError

    def stages(self, total_steps: int) -> tuple[Hashable, ...]:
        """Every distinct stage of a run of ``total_steps`` steps, in order (one compilation each)."""
        return (self.stage(0, total_steps),)

    def patches_per_block(self, stage: Hashable, depth: int) -> tuple[int, ...]:
        """How many patch tokens each of the student's ``depth`` blocks sees in ``stage``."""
        raise NotImplementedError

    @staticmethod
    def _common(mcfg, num_patches: int) -> dict:
        return dict(
            num_patches=num_patches,
            selection=mcfg.selection,
            temperature=float(mcfg.temperature),
            token_multiple=int(mcfg.get("token_multiple", 1)),
        )

    def _all_patches(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(self.num_patches, dtype=jnp.int32), (batch, self.num_patches))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverTrainingPlan(KeepPlan):
    """Student input = CLS + K kept patches, K fixed within a stage and falling over training."""

    schedule: MaskRatioSchedule

    @classmethod
    def from_config(cls, mcfg, num_patches: int, depth: int) -> OverTrainingPlan:
        schedule = MaskRatioSchedule(tuple(mcfg.stage_starts), tuple(mcfg.stage_ratios))
        return cls(schedule=schedule, **cls._common(mcfg, num_patches))

    def stage(self, step: int, total_steps: int) -> int:
        return keep_count(self.num_patches, self.schedule.mask_ratio(step, total_steps), self.token_multiple)

    def stage_metrics(self, stage: int) -> dict[str, float]:
        return {"keep": stage}

    def stages(self, total_steps: int) -> tuple[int, ...]:
        firsts = [
            min(math.ceil(start * total_steps - 1e-9), total_steps - 1) for start in self.schedule.starts
        ]
        return tuple(dict.fromkeys(self.stage(max(step, 0), total_steps) for step in firsts))

    def patches_per_block(self, stage: int, depth: int) -> tuple[int, ...]:
        return (stage,) * depth

    def score_layers(self, teacher_depth: int) -> tuple[int, ...]:
        return (teacher_depth,)

    def select(self, rng, scores_by_layer, stage: int) -> KeptTokens:
        (scores,) = scores_by_layer.values()
        keep = select_tokens(rng, scores, stage, self.selection, self.temperature)
        return KeptTokens(input_indices=keep, drop_after=None, sets=((1, keep),))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverDepthPlan(KeepPlan):
    """EViT-style: all patches enter; after block ``drop_layers[i]`` only ``1 - drop_ratios[i]`` stay."""

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
        check_mask_ratios("masking.drop_ratios", self.drop_ratios, non_decreasing=True)

    @classmethod
    def from_config(cls, mcfg, num_patches: int, depth: int) -> OverDepthPlan:
        return cls(
            drop_layers=tuple(mcfg.drop_layers),
            drop_ratios=tuple(mcfg.drop_ratios),
            depth=depth,
            **cls._common(mcfg, num_patches),
        )

    def stage(self, step: int, total_steps: int) -> tuple[int, ...]:
        return tuple(keep_count(self.num_patches, r, self.token_multiple) for r in self.drop_ratios)

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

    def select(self, rng, scores_by_layer, stage: tuple[int, ...]) -> KeptTokens:
        scores = [scores_by_layer[layer] for layer in self.drop_layers]
        relative, absolute = nested_selection(rng, scores, stage, self.selection, self.temperature)
        sets = ((1, self._all_patches(scores[0].shape[0])),)
        sets += tuple((layer + 1, idx) for layer, idx in zip(self.drop_layers, absolute))
        return KeptTokens(input_indices=None, drop_after=dict(zip(self.drop_layers, relative)), sets=sets)


PLANS: dict[str, type[KeepPlan]] = {"over_training": OverTrainingPlan, "over_depth": OverDepthPlan}
MODES = tuple(PLANS)


def keep_plan(mcfg, num_patches: int, depth: int) -> KeepPlan:
    """The plan of ``mcfg.mode`` (a ``masking`` config section) for a student of ``depth`` blocks."""
    if mcfg.mode not in PLANS:
        raise ConfigError(f"masking.mode={mcfg.mode!r}: expected one of {list(PLANS)}")
    return PLANS[mcfg.mode].from_config(mcfg, num_patches, depth)

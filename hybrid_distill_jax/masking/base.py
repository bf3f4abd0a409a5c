"""The masking plans' shared machinery: patch scores, the selections, the kept sets, the ``KeepPlan``
interface and its registry, and the ``masking`` config section built from every plan's fields.

A plan is a ``KeepPlan`` subclass in its own module of this package, decorated with ``@register``: it
names its ``mode`` and owns its fields (``defaults``) and their ``ranges``. The section is flat: it holds
the shared fields and every registered plan's, so any plan's field can be set whichever mode is chosen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError

SELECTIONS = ("gumbel", "topk", "random")

# How the scoring teacher rates a patch at each of the plan's layers: 'cls_attention', its CLS -> patch
# attention there (averaged over heads; the paper's); 'map_attention', its MAP head's query -> patch
# attention (a teacher without CLS, e.g. SigLIP; the same scores at every layer, read off its final
# tokens); 'token_norm', the L2 norm of each patch token after that layer (any teacher).
SCORES = ("cls_attention", "map_attention", "token_norm")

# The fields every plan reads, beside each plan's own.
SHARED_DEFAULTS = dict(
    mode="over_training",
    selection="gumbel",
    temperature=1.0,
    score_teacher="deit",
    score="cls_attention",
    # 1, or e.g. 8/16/32: masked stages keep K patches with CLS + K a multiple of it (fewer patches than
    # the ratio says; shapes GPU and TPU kernels tile without padding). A multiple that would cost a stage
    # more than MAX_ROUNDING_LOSS of its patches is refused (check_token_multiple).
    token_multiple=1,
)
SHARED_RANGES = {"temperature": checks.POSITIVE, "token_multiple": checks.ints(1, "1: off")}

PLANS: dict[str, type[KeepPlan]] = {}


def register(cls: type[KeepPlan]) -> type[KeepPlan]:
    """Class decorator: makes ``cls`` the plan of ``masking.mode == cls.mode``."""
    PLANS[cls.mode] = cls
    return cls


def redundancy_scores(cls_attn: jax.Array) -> jax.Array:
    """CLS->patch attention [B, H, N] averaged over heads -> importance score [B, N] (fp32)."""
    return jnp.mean(cls_attn.astype(jnp.float32), axis=1)


def score_request(score: str, layers: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """What the scoring teacher's pass must return for ``score`` at ``layers`` (keyword arguments)."""
    if score == "cls_attention":
        return {"cls_attn_layers": layers}
    if score == "token_norm":
        return {"hidden_layers": layers}
    return {}  # map_attention: the MAP head's attention is always in the outputs


def patch_scores(score: str, out: Mapping, layer: int, num_prefix: int) -> jax.Array:
    """The scoring teacher's importance of each patch [B, N] (fp32) at ``layer``, from its outputs."""
    if score == "cls_attention":
        return redundancy_scores(out["cls_attn"][layer])
    if score == "map_attention":
        return redundancy_scores(out["map_attn"])
    patches = out["hidden"][layer][:, num_prefix:].astype(jnp.float32)
    return jnp.sqrt(jnp.sum(patches * patches, axis=-1))


def check_scorer(mcfg, scorer: Mapping) -> None:
    """``masking.score`` against the scoring teacher's architecture (``arch_dict``); one-line ConfigError."""
    name = mcfg.score_teacher
    if mcfg.score == "cls_attention":
        checks.require(
            scorer.get("class_token", True),
            f"masking.score='cls_attention': teacher {name!r} has no CLS token; use masking.score="
            f"{'map_attention' if scorer.get('pool') == 'map' else 'token_norm'!r}",
        )
    if mcfg.score == "map_attention":
        checks.require(
            scorer.get("pool") == "map",
            f"masking.score='map_attention': teacher {name!r} has no MAP head (pool={scorer.get('pool')!r}); "
            "use 'cls_attention' or 'token_norm'",
        )


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


def keep_count(num_patches: int, mask_ratio: float, token_multiple: int = 1) -> int:
    """Number of kept patches for a mask ratio (at least one). ``token_multiple`` > 1: a masked count is
    lowered until CLS + K is a multiple of it (hardware-friendly sequence lengths); the unmasked count
    (every patch) is kept as it is."""
    k = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    if token_multiple > 1 and k < num_patches:
        k = max((1 + k) // token_multiple * token_multiple - 1, 1)
    return k


# The largest fraction of a masked stage's patches that token_multiple's rounding may cost it.
MAX_ROUNDING_LOSS = 0.25


def check_token_multiple(num_patches: int, ratios_field: str, mask_ratios, token_multiple: int) -> None:
    """Refuses a ``masking.token_multiple`` that rounds a masked stage's count far from the one its mask
    ratio asks for: more than ``MAX_ROUNDING_LOSS`` (a quarter) of its patches lost. One-line ConfigError
    naming the field, the stage and the largest power of two that would do.

    Rounding CLS + K down to a multiple of m costs fewer than m patches, so a stage keeping at least
    4 (m - 1) patches always passes; a multiple near or above K leaves a handful, or a single patch (128
    on ViT-B/16 at 224 px: 98 -> 1), and silently trains another method. The limit is a quarter because
    it keeps a stage of mask ratio r at an effective ratio of at most r + (1 - r) / 4: the recipes' 0.5
    stage stays within 0.625, half the 0.25 step between their stages, so the schedule still means what it
    says. Aligned lengths are for speed; they must not change what is learnt more than that.
    """

    def costly(multiple: int) -> list[tuple[float, int, int]]:
        stages = [(r, keep_count(num_patches, r), keep_count(num_patches, r, multiple)) for r in mask_ratios]
        return [(r, asked, kept) for r, asked, kept in stages if kept < (1 - MAX_ROUNDING_LOSS) * asked]

    refused = costly(token_multiple)
    if refused:
        ratio, asked, kept = refused[0]
        smaller = (2**i for i in reversed(range((token_multiple - 1).bit_length())))  # ..., 4, 2, 1
        best = next(m for m in smaller if not costly(m))
        use = f"{best} or less for {num_patches} patches, or 1 (off)" if best > 1 else "1 (off)"
        raise ConfigError(
            f"masking.token_multiple={token_multiple}: the stage with {ratios_field} {ratio:g} would keep "
            f"{kept} of its {asked} patches (CLS + K rounded down to a multiple of {token_multiple}), losing "
            f"more than {MAX_ROUNDING_LOSS:.0%} of them; use {use}"
        )


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
    selection itself runs inside the jitted step from the scoring teacher's CLS attention. ``defaults``
    and ``ranges`` are the plan's own fields of the ``masking`` section; checks that need the student
    (its depth, its patch count) belong in ``from_config``, which validation runs up front.
    """

    mode: ClassVar[str]
    defaults: ClassVar[dict] = {}
    ranges: ClassVar[dict[str, checks.Range]] = {}

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


def section() -> ml_collections.ConfigDict:
    """The config's ``masking`` section: the shared fields and every registered plan's own."""
    fields = dict(SHARED_DEFAULTS)
    for cls in PLANS.values():
        fields.update(cls.defaults)
    return ml_collections.ConfigDict(fields)


def check_section(mcfg, teachers: Iterable[str]) -> None:
    """The section's checks that need no student: the shared fields, and every registered plan's ranges
    whichever mode is chosen (the section holds them all). ``teachers``: the names ``score_teacher`` may
    take."""
    checks.one_of(mcfg.mode, sorted(PLANS), "masking.mode")
    checks.one_of(mcfg.selection, SELECTIONS, "masking.selection")
    checks.one_of(mcfg.get("score", "cls_attention"), SCORES, "masking.score")
    ranges = dict(SHARED_RANGES)
    for cls in PLANS.values():
        ranges.update(cls.ranges)
    checks.check_ranges(mcfg, ranges, prefix="masking.")
    teachers = sorted(teachers)
    checks.require(
        mcfg.score_teacher == "" or mcfg.score_teacher in teachers,
        f"masking.score_teacher={mcfg.score_teacher!r}: no such teacher; expected '' (uniform scores) or one "
        f"of {', '.join(teachers)}",
    )


def keep_plan(mcfg, num_patches: int, depth: int) -> KeepPlan:
    """The plan of ``mcfg.mode`` (a ``masking`` config section) for a student of ``depth`` blocks."""
    if mcfg.mode not in PLANS:
        raise ConfigError(f"masking.mode={mcfg.mode!r}: expected one of {sorted(PLANS)}")
    return PLANS[mcfg.mode].from_config(mcfg, num_patches, depth)

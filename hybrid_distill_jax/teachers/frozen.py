"""A teacher as a config names it (``config.teachers.NAME``, built by :func:`teacher_config`) and as the
step runs it (:class:`FrozenTeacher`: an exported ViT, frozen, at its own resolution and normalisation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.build import (
    ATTN_IMPLS,
    abstract_params,
    attention_fields,
    dtype_of,
    normalize,
)
from hybrid_distill_jax.models.vit import VisionTransformer, add_fp8_scales, make_vit
from hybrid_distill_jax.teachers.resolve import describe, load_model

TEACHER_FIELDS = dict(
    checkpoint="", dtype="bfloat16", image_size=0, attn_impl="", fp8=False, interpolate_grid=False
)
TEACHER_RANGES = {"image_size": checks.ints(0, "0: the teacher's own")}


def teacher_config(checkpoint: str = "", **fields) -> ml_collections.ConfigDict:
    """A ``config.teachers`` entry: a frozen exported/converted ViT (directory or ``hf-hub:`` name).

    ``dtype`` (bfloat16) is what it computes in; ``image_size`` (0: its own) the resolution it is fed the
    crop at; ``attn_impl`` ('' fastest here, 'xla', 'cudnn') its attention kernel; ``fp8`` its block
    matmuls on float8 operands; ``interpolate_grid`` lets its patch grid differ from the student's (a /14
    teacher at 224 px beside a /16 student): its patch outputs are resampled onto the student's grid
    (``resample_patches``). Without it a differing grid is refused."""
    unknown = sorted(set(fields) - set(TEACHER_FIELDS))
    if unknown:
        raise ConfigError(f"teacher_config: no field {unknown[0]!r}; fields: {sorted(TEACHER_FIELDS)}")
    return ml_collections.ConfigDict(dict(TEACHER_FIELDS, checkpoint=checkpoint, **fields))


def check_teacher_entry(name: str, tcfg) -> None:
    """``config.teachers.NAME``'s own fields, checked up front; a one-line ConfigError naming the field."""
    field = f"teachers.{name}"
    checks.require(
        name.isidentifier() and name != "student",
        f"{field}: a teacher's name must be an identifier other than 'student'",
    )
    checks.require(
        isinstance(tcfg, ml_collections.ConfigDict) and "checkpoint" in tcfg,
        f"{field}: expected a teacher entry ({', '.join(TEACHER_FIELDS)})",
    )
    checks.one_of(tcfg.get("attn_impl", ""), ATTN_IMPLS, f"{field}.attn_impl")
    checks.one_of(tcfg.get("interpolate_grid", False), (False, True), f"{field}.interpolate_grid")
    checks.check_ranges(tcfg, TEACHER_RANGES, prefix=f"{field}.")


def _resize_grid(x: jax.Array, axis: int, grid: int) -> jax.Array:
    """Bilinear resize of a square patch axis (``axis``, length g*g) of ``x`` to ``grid``*``grid``, fp32."""
    x = jnp.moveaxis(x, axis, 1)
    b, n, *rest = x.shape
    g = math.isqrt(n)
    square = x.astype(jnp.float32).reshape(b, g, g, -1)
    square = jax.image.resize(square, (b, grid, grid, square.shape[-1]), method="bilinear")
    return jnp.moveaxis(square.reshape(b, grid * grid, *rest).astype(x.dtype), 1, axis)


def resample_patches(out: dict, num_prefix: int, grid: int) -> dict:
    """A teacher's outputs with every patch-indexed one resampled onto a ``grid`` x ``grid`` patch grid:
    the patch part of ``tokens``, ``hidden`` and ``qk`` (queries and keys: the relations of the
    interpolated tokens), and the ``cls_attn`` / ``map_attn`` scores. Prefix tokens pass unchanged. Full
    attention maps (``attn_logits``) cannot be resampled this way; nothing requests them here."""

    def tokens(x):
        return jnp.concatenate([x[:, :num_prefix], _resize_grid(x[:, num_prefix:], 1, grid)], axis=1)

    out = dict(out)
    out["tokens"] = tokens(out["tokens"])
    out["hidden"] = {layer: tokens(x) for layer, x in out["hidden"].items()}
    out["qk"] = {layer: (tokens(q), tokens(k)) for layer, (q, k) in out["qk"].items()}
    out["cls_attn"] = {layer: _resize_grid(a, 2, grid) for layer, a in out["cls_attn"].items()}
    if "map_attn" in out:
        out["map_attn"] = _resize_grid(out["map_attn"], 2, grid)
    return out


@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
    """A frozen, exported ViT with its own input resolution and normalisation.

    ``source`` says where its weights came from: the ``converted_from`` record of its ``model.json`` (for
    an ``hf-hub:`` name: repo, revision, resolved commit and file hash), else its directory.
    """

    model: VisionTransformer
    mean: tuple
    std: tuple
    image_size: int
    source: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(
        cls, cfg, field: str, *, abstract: bool = False, platform: str | None = None
    ) -> tuple[FrozenTeacher, Any]:
        """The teacher ``cfg`` names and its parameters in ``cfg.dtype``; ``abstract``: their shapes only
        (ShapeDtypeStructs, from ``model.json`` or a hub name's description: nothing is read or fetched).
        ``platform`` (default: JAX's) picks the attention kernel when ``cfg.attn_impl`` is ''.
        ``cfg.fp8``: the blocks' matmuls on float8 operands, with weight scales computed here, once."""
        dtype = dtype_of(cfg.get("dtype", "bfloat16"), f"{field}.dtype")
        overrides = dict(dtype=dtype, drop_path=0.0)
        if abstract:
            meta = describe(cfg.checkpoint, f"{field}.checkpoint")
            model = make_vit(meta["arch"], **overrides)
            params = abstract_params(model, dtype)
        else:
            model, params, meta = load_model(cfg.checkpoint, f"{field}.checkpoint", **overrides)
            params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        model = model.clone(**attention_fields(model, cfg.get("attn_impl", ""), platform, trained=False))
        if cfg.get("fp8", False):
            model = model.clone(fp8=True)
            params = add_fp8_scales(model, params)
        size = cfg.get("image_size") or meta["input"]["image_size"]
        source = meta.get("converted_from") or {"model_dir": str(cfg.checkpoint)}
        mean, std = tuple(meta["input"]["mean"]), tuple(meta["input"]["std"])
        return cls(model, mean, std, int(size), source), params

    @property
    def grid(self) -> int:
        return self.image_size // self.model.patch_size

    def __call__(self, params, images, *, grid: int | None = None, **kwargs):
        """The frozen model's outputs on ``images``; ``grid``: on that patch grid (``resample_patches``)
        where the teacher's own differs."""
        out = self.model.apply(
            {"params": params}, normalize(images, self.mean, self.std, self.image_size), **kwargs
        )
        if grid is not None and grid != self.grid:
            out = resample_patches(out, self.model.num_prefix, grid)
        return jax.tree.map(jax.lax.stop_gradient, out)

"""Building models from config sections, and the pieces every task shares around them.

``vit_from_config`` turns a ``student``/``model`` section into a ViT; ``normalize`` maps the uint8 (or
[0, 1] float) batch to a model's own resolution and normalisation inside the jitted step;
``attention_fields`` picks a model's attention kernel; ``pooled_features`` is the representation the
probes read.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import (
    REMAT_POLICIES,
    VisionTransformer,
    decode_variant,
    make_vit,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# A config's ``attn_impl``: '' is the fastest kernel that works on the platform (``attention_fields``).
ATTN_IMPLS = ("", "xla", "cudnn")
# JAX runs cuDNN's fused attention with gradients on even token counts only.
CUDNN_TRAINING_LENGTH_MULTIPLE = 2


def dtype_of(name: str, field: str):
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_defaults() -> dict:
    """The architecture and numerics fields of a trained ViT's config section (``student`` in distill
    mode, ``model`` in the others)."""
    return dict(
        variant="B/16",
        drop_path=0.1,
        dtype="float32",
        param_dtype="float32",
        remat_policy="none",  # or 'full', 'dots_saveable', ... (models.vit.REMAT_POLICIES)
        attn_impl="",  # blocks whose probabilities nobody reads: '' fastest here, 'xla' or 'cudnn'
        mean=model_io.IMAGENET_MEAN,
        std=model_io.IMAGENET_STD,
    )


MODEL_RANGES = {"drop_path": checks.UNIT, "mean": checks.PROBABILITY, "std": checks.POSITIVE}


def check_model_config(mcfg, image_size: int, field: str) -> dict:
    """A trained ViT's config section checked up front; its patch_size, depth, num_heads and width."""
    checks.check_ranges(mcfg, MODEL_RANGES, prefix=f"{field}.")
    arch = decode_variant(mcfg.variant) if mcfg.get("variant") else {}
    patch = mcfg.get("patch_size", arch.get("patch_size"))
    checks.require(patch is not None and patch > 0, f"{field}.patch_size: a positive patch size is required")
    checks.require(
        image_size % patch == 0, f"image_size={image_size} is not divisible by {field} patch size {patch}"
    )
    checks.one_of(mcfg.get("remat_policy", "none"), REMAT_POLICIES, f"{field}.remat_policy")
    checks.one_of(mcfg.get("attn_impl", ""), ATTN_IMPLS, f"{field}.attn_impl")
    width = mcfg.get("width", arch.get("width"))
    heads = mcfg.get("num_heads", arch.get("num_heads"))
    checks.require(width % heads == 0, f"{field}: width {width} is not divisible by num_heads {heads}")
    depth = mcfg.get("depth", arch.get("depth"))
    return {"patch_size": patch, "depth": depth, "num_heads": heads, "width": width}


def vit_from_config(mcfg, field: str, *, platform: str | None = None, **overrides) -> VisionTransformer:
    """The trained ViT a config section describes (``variant`` + fields), its dtypes, its attention
    kernel for ``platform`` (default: JAX's), and ``overrides``."""
    non_arch = ("mean", "std", "dtype", "param_dtype", "attn_impl")
    model = make_vit(
        {k: v for k, v in mcfg.items() if k not in non_arch},
        dtype=dtype_of(mcfg.get("dtype", "float32"), f"{field}.dtype"),
        param_dtype=dtype_of(mcfg.get("param_dtype", "float32"), f"{field}.param_dtype"),
        **overrides,
    )
    return model.clone(**attention_fields(model, mcfg.get("attn_impl", ""), platform, trained=True))


def normalize(images: jax.Array, mean, std, image_size: int) -> jax.Array:
    """uint8 images (0..255, as the input pipelines ship them) or float images in [0, 1] -> fp32 at a
    model's own resolution and normalisation (the same crop for every model). The one place where pixels
    become floats: inside the jitted step, on the device."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    else:
        images = images.astype(jnp.float32)
    if images.shape[1] != image_size:
        b, _, _, c = images.shape
        images = jax.image.resize(images, (b, image_size, image_size, c), method="bicubic")
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def fastest_attention_kernel(model: VisionTransformer, platform: str | None = None) -> str | None:
    """The fastest kernel for attention whose probabilities nobody reads: cuDNN's fused attention on
    NVIDIA GPUs for bf16/fp16 models with a head size it takes (a multiple of 8, at most 128); elsewhere
    None, XLA's choice."""
    platform = platform or jax.default_backend()
    head_dim = model.width // model.num_heads
    reduced = jnp.dtype(model.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform in ("gpu", "cuda") and reduced and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return None


def attention_fields(
    model: VisionTransformer, attn_impl: str, platform: str | None, *, trained: bool
) -> dict:
    """``model``'s attention fields for a config's ``attn_impl`` ('' = ``fastest_attention_kernel``):
    the kernel, and for a trained model on cuDNN the padding to even token counts its gradient needs
    (a frozen model's forward-only kernel takes any length)."""
    impl = attn_impl or fastest_attention_kernel(model, platform)
    multiple = CUDNN_TRAINING_LENGTH_MULTIPLE if trained and impl == "cudnn" else 1
    return {"attn_impl": impl, "attn_length_multiple": multiple}


def abstract_params(model: VisionTransformer, dtype) -> Any:
    """The shapes of ``model``'s parameters, as ShapeDtypeStructs of ``dtype`` (nothing is allocated)."""
    size = model.image_size
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes["params"])


def pooled_features(out: dict, pool: str, num_prefix: int = 1) -> jax.Array:
    """'cls': the final-norm CLS token; 'gap': mean of the final-norm patch tokens."""
    tokens = out["tokens"].astype(jnp.float32)
    if pool == "cls":
        return tokens[:, 0]
    if pool == "gap":
        return jnp.mean(tokens[:, num_prefix:], axis=1)
    raise ConfigError(f"eval.pool={pool!r}: expected 'cls' or 'gap'")

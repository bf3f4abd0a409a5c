"""A pure-functional Flax (linen) Vision Transformer for students and teachers alike.

One module covers timm ViT/DeiT (incl. the distillation token), MAE encoders, DINO and CLIP visual
towers (``ln_pre``, QuickGELU, ``proj``), DINOv2 with registers (register tokens, LayerScale, no position
embedding on the prefix), DINOv3 (rotary position embeddings) and SigLIP (no CLS, a MAP head). Tokens are
ordered prefix first: CLS (if ``class_token``), the distillation token, the registers, then the patches;
everything that indexes patches skips the ``num_prefix`` tokens. The forward pass can

* run on a subset of patch tokens (``keep_indices``, a static count K), masked MAE-style after the
  position embedding, and drop further tokens inside the network (``drop_after``, EViT-style);
* return attention *logits* for a static tuple of layers only (the relation targets), and the
  CLS->patch attention probabilities of chosen layers (the redundancy score).

Layers are numbered from 1 (block 1 is the first transformer block). Softmax runs in fp32 whatever the
compute ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax.errors import ConfigError

Dtype = Any

# name -> (width, depth, heads, mlp_dim). The small ones exist for CPU tests and the embedded demo.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "pico": (32, 2, 2, 64),
    "nano": (64, 4, 4, 256),
    "micro": (96, 6, 4, 384),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


# Rematerialisation of each transformer block in the backward pass: 'none' keeps every activation,
# 'full' recomputes the whole block (saves only its input), the others are ``jax.checkpoint_policies``
# (e.g. 'dots_saveable' keeps matmul outputs and recomputes norms, activations and softmax).
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "nothing_saveable",
    "everything_saveable",
)


def remat_policy(name: str):
    """False (no remat), None (full remat) or a ``jax.checkpoint_policies`` function."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"remat_policy={name!r}: expected one of {list(REMAT_POLICIES)}")
    if name == "none":
        return False
    if name == "full":
        return None
    return getattr(jax.checkpoint_policies, name)


def decode_variant(variant: str) -> dict[str, int]:
    """'B/16' -> dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
        raise ConfigError(
            f"model variant {variant!r}: expected '<size>/<patch>', size in {sorted(VARIANTS)}, e.g. 'B/16'"
        )
    width, depth, heads, mlp = VARIANTS[name]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(patch))


def quick_gelu(x):
    """CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


def sincos_posemb_2d(grid: int, width: int, num_prefix: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MAE), zeros for the prefix tokens: [1, P + grid^2, D]."""
    if width % 4:
        raise ConfigError(f"model.width={width}: sincos position embedding needs a width divisible by 4")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    out_h = np.einsum("n,d->nd", ys.reshape(-1), omega)
    out_w = np.einsum("n,d->nd", xs.reshape(-1), omega)
    emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    emb = np.concatenate([np.zeros((num_prefix, width)), emb], axis=0)
    return emb[None].astype(np.float32)


def resample_posemb(posemb: jax.Array, num_prefix: int, new_grid: int) -> jax.Array:
    """Bicubically resizes the patch part of a [1, P + g*g, D] position embedding to new_grid^2 patches."""
    prefix, patches = posemb[:, :num_prefix], posemb[:, num_prefix:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ConfigError(f"position embedding with {patches.shape[1]} patch tokens is not a square grid")
    if old_grid == new_grid:
        return posemb
    grid = patches.reshape(1, old_grid, old_grid, -1).astype(jnp.float32)
    grid = jax.image.resize(grid, (1, new_grid, new_grid, grid.shape[-1]), method="bicubic")
    patches = grid.reshape(1, new_grid * new_grid, -1).astype(posemb.dtype)
    return jnp.concatenate([prefix, patches], axis=1)


def gather_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [B, N, ...], indices [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def rope_periods(head_dim: int, temperature: float) -> np.ndarray:
    """DINOv3's rotary periods: ``temperature ** (2 i / (head_dim / 2))`` for i < head_dim / 4 (fp32);
    ``check_arch`` refuses a head dimension not divisible by 4."""
    exponents = 2.0 * np.arange(head_dim // 4, dtype=np.float32) / np.float32(head_dim // 2)
    return (np.float32(temperature) ** exponents).astype(np.float32)


def rope_table(grid_h: int, grid_w: int, head_dim: int, temperature: float) -> np.ndarray:
    """DINOv3's rotary table for an ``grid_h x grid_w`` patch grid: [grid_h * grid_w, 2, head_dim] fp32
    (sin, cos), row-major over patches. Each patch's centre is normalised by the grid's own size to
    [-1, 1] per axis, so any resolution reuses the trained frequencies; the first half of the head
    dimension rotates by the y angles then the x angles, the second half repeats them ('rotate half')."""
    ys = (np.arange(grid_h, dtype=np.float32) + np.float32(0.5)) / np.float32(grid_h)
    xs = (np.arange(grid_w, dtype=np.float32) + np.float32(0.5)) / np.float32(grid_w)
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)
    angles = np.float32(2 * math.pi) * coords[:, :, None] / rope_periods(head_dim, temperature)[None, None]
    angles = angles.reshape(angles.shape[0], -1)  # [N, head_dim / 2]: y frequencies, then x
    angles = np.concatenate([angles, angles], axis=-1)
    return np.stack([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def apply_rope(x: jax.Array, table: jax.Array, num_prefix: int) -> jax.Array:
    """Rotates the patch tokens of ``x`` [B, N, H, Dh] by ``table`` [B, N - num_prefix, 2, Dh] (sin, cos),
    in fp32; the prefix tokens pass unrotated."""
    patches = x[:, num_prefix:].astype(jnp.float32)
    sin, cos = table[:, :, None, 0], table[:, :, None, 1]
    first, second = jnp.split(patches, 2, axis=-1)
    rotated = patches * cos + jnp.concatenate([-second, first], axis=-1) * sin
    return jnp.concatenate([x[:, :num_prefix], rotated.astype(x.dtype)], axis=1)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


_REDUCED_DOT = {
    jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
    jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32,
}


E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def fp8_scale(x: jax.Array, axis) -> jax.Array:
    """fp32 scales that map the largest magnitude along ``axis`` (reduced away) onto e4m3's largest."""
    amax = jnp.max(jnp.abs(x), axis=axis).astype(jnp.float32)
    return jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / E4M3_MAX


def to_e4m3(x: jax.Array, scale: jax.Array) -> jax.Array:
    return jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


class Fp8Dot(nn.Module):
    """``dot_general`` of a frozen model's dense layer with float8 (e4m3) operands.

    The weight is scaled per output channel by ``kernel_scale``, a parameter computed once from the
    weights themselves (``add_fp8_scales``); the input per token (each row of the contraction), on the
    fly, so no scale crosses devices. The product accumulates in fp32, comes out in the input's dtype and
    is rescaled in fp32. XLA lowers it to cuBLASLt's fp8 GEMM on Hopper and later GPUs and upcasts the
    operands elsewhere (same values, no speed-up).
    """

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (lhs_contract, rhs_contract), batch = dimension_numbers
        if batch != ((), ()):
            raise ValueError("Fp8Dot: batched dot_general is not supported")
        lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
        kernel_scale = self.param("kernel_scale", lambda _: fp8_scale(rhs, rhs_contract))
        lhs_scale = fp8_scale(lhs, lhs_contract)
        rhs_free = rhs.ndim - len(rhs_contract)
        out = jax.lax.dot_general(
            to_e4m3(lhs, jnp.expand_dims(lhs_scale, lhs_contract)),
            to_e4m3(rhs, jnp.expand_dims(kernel_scale, rhs_contract)),
            dimension_numbers,
            preferred_element_type=lhs.dtype,
        )
        row_scale = lhs_scale.reshape(lhs_scale.shape + (1,) * rhs_free)
        return (out.astype(jnp.float32) * row_scale * kernel_scale).astype(lhs.dtype)


def fused_attention(q, k, v, *, scale: float, implementation: str | None, length_multiple: int = 1):
    """``jax.nn.dot_product_attention`` of [B, N, H, Dh] queries, keys and values, with N padded up to
    a multiple of ``length_multiple`` where the kernel needs it (cuDNN's training kernel takes even
    lengths only). The padded keys are masked out (``key_value_seq_lengths``) and the padded query rows
    dropped, so the result and its gradients are the unpadded ones."""
    n = q.shape[1]
    pad = -n % length_multiple
    if not pad:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=implementation
    )
    return out[:, :n]


class Attention(nn.Module):
    """Multi-head self-attention that can expose its logits, its CLS row, or its scaled queries and keys
    on request (``want_qk``: any block of the logits is then one small product away, and the attention
    itself stays on the fused kernel)."""

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str | None = None  # fused attention kernel: None (XLA picks), 'xla' or 'cudnn'
    fp8: bool = False  # frozen models only: qkv and projection on Fp8Dot
    attn_length_multiple: int = 1  # the fused kernel sees the token count padded to a multiple of this

    @nn.compact
    def __call__(
        self,
        x,
        *,
        want_logits: bool = False,
        want_cls: bool = False,
        num_prefix: int = 1,
        want_qk: bool = False,
        rope: jax.Array | None = None,
    ):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ConfigError(f"model.width={width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general_cls=Fp8Dot if self.fp8 else None,
            name="qkv",
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
        if rope is not None:
            q, k = apply_rope(q, rope, num_prefix), apply_rope(k, rope, num_prefix)
        scale = 1.0 / math.sqrt(head_dim)
        extras = {}
        if want_qk:
            extras["q"], extras["k"] = q * scale, k
        if want_logits:
            # Reduced-precision models: bf16 (fp16) operands with fp32 accumulation in both products and,
            # through the algorithm, in their backward too (whose fp32 cotangents would otherwise make
            # the gradient products fp32 GEMMs). The logits and the softmax stay fp32.
            precision = None if self.dtype == jnp.float32 else _REDUCED_DOT.get(jnp.dtype(self.dtype))
            logits = jnp.einsum(
                "bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=jnp.float32, precision=precision
            )
            probs = jax.nn.softmax(logits, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v, precision=precision)
            extras["logits"] = logits
            if want_cls:
                extras["cls"] = probs[:, :, 0, num_prefix:]  # the caller checks the model has a CLS token
        else:
            out = fused_attention(
                q, k, v, scale=scale, implementation=self.attn_impl, length_multiple=self.attn_length_multiple
            )
            if want_cls:
                cls_logits = jnp.einsum(
                    "bhd,bkhd->bhk", q[:, 0] * scale, k, preferred_element_type=jnp.float32
                )
                extras["cls"] = jax.nn.softmax(cls_logits, axis=-1)[:, :, num_prefix:]
        out = nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general_cls=Fp8Dot if self.fp8 else None,
            name="proj",
        )(out)
        return out, extras


class MlpBlock(nn.Module):
    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        dense = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, dot_general_cls=Fp8Dot if self.fp8 else None
        )
        x = nn.Dense(self.mlp_dim, name="fc1", **dense)(x)
        x = ACTIVATIONS[self.act](x)
        return nn.Dense(width, name="fc2", **dense)(x)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT, DINOv2): ``x * gamma``."""

    init_value: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.constant(self.init_value)
        gamma = self.param("gamma", init, (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-LN transformer block, with LayerScale on both branches when ``layer_scale_init`` is set."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str | None = None
    fp8: bool = False
    attn_length_multiple: int = 1
    layer_scale_init: float | None = None

    @nn.compact
    def __call__(
        self,
        x,
        train: bool = False,
        want_logits: bool = False,
        want_cls: bool = False,
        num_prefix: int = 1,
        want_qk: bool = False,
        rope: jax.Array | None = None,
    ):
        norm = dict(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        y, extras = Attention(
            self.num_heads,
            self.qkv_bias,
            self.dtype,
            self.param_dtype,
            self.attn_impl,
            self.fp8,
            self.attn_length_multiple,
            name="attn",
        )(
            nn.LayerNorm(name="norm1", **norm)(x),
            want_logits=want_logits,
            want_cls=want_cls,
            num_prefix=num_prefix,
            want_qk=want_qk,
            rope=rope,
        )
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls1")(y)
        x = x + DropPath(self.drop_path)(y, deterministic=not train)
        y = MlpBlock(self.mlp_dim, self.act, self.dtype, self.param_dtype, self.fp8, name="mlp")(
            nn.LayerNorm(name="norm2", **norm)(x)
        )
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls2")(y)
        x = x + DropPath(self.drop_path)(y, deterministic=not train)
        return x, extras


class MapHead(nn.Module):
    """Multihead attention pooling (SigLIP's MAP head): one learned query attends over the tokens, then a
    residual MLP. Returns the pooled vector [B, D] and the query's attention probabilities [B, H, N] (fp32),
    which score patches for a model without CLS."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, width = x.shape
        head_dim = width // self.num_heads
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latent = self.param("latent", nn.initializers.normal(0.02), (1, 1, width), self.param_dtype)
        q = nn.Dense(width, name="q", **dense)(latent.astype(self.dtype)).reshape(1, self.num_heads, head_dim)
        kv = nn.Dense(2 * width, name="kv", **dense)(x).reshape(b, n, 2, self.num_heads, head_dim)
        logits = jnp.einsum(
            "hd,bkhd->bhk", q[0] / math.sqrt(head_dim), kv[:, :, 0], preferred_element_type=jnp.float32
        )
        probs = jax.nn.softmax(logits, axis=-1)
        pooled = jnp.einsum("bhk,bkhd->bhd", probs.astype(self.dtype), kv[:, :, 1]).reshape(b, width)
        pooled = nn.Dense(width, name="proj", **dense)(pooled)
        y = nn.LayerNorm(epsilon=self.norm_eps, name="norm", **dense)(pooled)
        pooled = pooled + MlpBlock(self.mlp_dim, self.act, self.dtype, self.param_dtype, name="mlp")(y)
        return pooled, probs


class VisionTransformer(nn.Module):
    """ViT returning a dict of outputs.

    Outputs: ``tokens`` (all tokens after the final norm, prefix first: [B, P+K, D]), ``pooled``
    (the CLS token, the mean patch token or the MAP head's output, by ``pool``), ``summary`` (the one
    vector an image is summarised by: CLIP's ``embedding`` if ``proj_dim``, else the MAP head's output,
    else the final CLS token, else the mean patch token),
    ``logits`` (if ``num_classes``), ``embedding`` (CLIP ``proj`` of the CLS token, if ``proj_dim``),
    ``map_attn`` (with ``pool='map'``: the MAP query's fp32 probabilities over the patches [B, H, K]),
    ``attn_logits`` {layer: fp32 [B, H, N_l, N_l]} for ``attn_layers``, ``cls_attn``
    {layer: fp32 [B, H, K_l]} (CLS -> patch probabilities) for ``cls_attn_layers``, and ``qk``
    {layer: (q / sqrt(Dh), k), each [B, N_l, H, Dh] in ``dtype``, after any rotary embedding} for
    ``qk_layers``: the logits of any token subset, ``einsum('bqhd,bkhd->bhqk', q[:, rows], k[:, cols])``,
    without the N x N map; and ``hidden`` {layer: [B, P+K_l, D] in ``dtype``}, the residual stream after
    block l (before any drop there and before the final norm), for ``hidden_layers``.
    """

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224  # sets the position-embedding grid; other inputs are resampled on the fly
    num_classes: int = 0
    class_token: bool = True
    dist_token: bool = False
    num_registers: int = 0  # register tokens (DINOv2-reg, DINOv3): prefix tokens no output reads
    ln_pre: bool = False
    final_norm: bool = True
    patch_bias: bool = True
    qkv_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-6
    # "learn", "sincos2d" (MAE; initialised fixed, stored as a parameter) or "rope" (DINOv3: no table,
    # queries and keys of the patches rotated in every block; see ``rope_table``)
    posemb: str = "learn"
    prefix_posemb: bool = True  # the table has entries for the prefix tokens too (timm: not no_embed_class)
    rope_temperature: float = 100.0  # posemb='rope' only
    layer_scale_init: float | None = None  # LayerScale on both residual branches, initialised to this
    pool: str = "cls"  # "cls", "gap" (mean of patch tokens) or "map" (a MAP head) for ``pooled``/``logits``
    proj_dim: int | None = None
    drop_path: float = 0.0
    remat_policy: str = "none"  # see REMAT_POLICIES: what each block saves for the backward pass
    # Kernel for attention whose probabilities nobody asked for: None lets XLA choose; 'cudnn' is the
    # fast fused kernel on NVIDIA GPUs (frozen models at any length; training needs even lengths, which
    # ``attn_length_multiple=2`` gives it by padding: ``fused_attention``).
    attn_impl: str | None = None
    attn_length_multiple: int = 1
    # Frozen models only: every block's matmuls on float8 operands (Fp8Dot; its weight scales are
    # parameters that ``add_fp8_scales`` computes from the loaded weights).
    fp8: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_prefix(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.num_registers

    @property
    def posemb_prefix(self) -> int:
        """How many prefix tokens have an entry in the position-embedding table."""
        return self.num_prefix if self.prefix_posemb else 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def prefix_tokens(self) -> list[jax.Array]:
        tokens = []
        for name, count, wanted in (
            ("cls_token", 1, self.class_token),
            ("dist_token", 1, self.dist_token),
            ("reg_token", self.num_registers, self.num_registers),
        ):
            if wanted:
                init = nn.initializers.normal(1e-6)
                tokens.append(self.param(name, init, (1, count, self.width), self.param_dtype))
        return tokens

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        keep_indices: jax.Array | None = None,
        drop_after: Mapping[int, jax.Array] | None = None,
        attn_layers: Sequence[int] = (),
        cls_attn_layers: Sequence[int] = (),
        qk_layers: Sequence[int] = (),
        hidden_layers: Sequence[int] = (),
        train: bool = False,
    ) -> dict[str, Any]:
        attn_layers, cls_attn_layers, qk_layers = tuple(attn_layers), tuple(cls_attn_layers), tuple(qk_layers)
        hidden_layers = tuple(hidden_layers)
        drop_after = dict(drop_after or {})
        for layer in attn_layers + cls_attn_layers + qk_layers + hidden_layers + tuple(drop_after):
            if not 1 <= layer <= self.depth:
                raise ConfigError(
                    f"layer {layer} requested from a ViT of depth {self.depth} (layers are 1..depth)"
                )
        if cls_attn_layers and not self.class_token:
            raise ConfigError("CLS attention requested from a ViT without a CLS token (class_token=False)")
        p = self.num_prefix
        x = nn.Conv(
            self.width,
            (self.patch_size,) * 2,
            strides=(self.patch_size,) * 2,
            padding="VALID",
            use_bias=self.patch_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(images.astype(self.dtype))
        b, h, w, _ = x.shape
        if h != w:
            raise ConfigError(f"non-square patch grid {h}x{w}: images must be square")
        x = x.reshape(b, h * w, self.width)

        rope = None
        prefix_pos = jnp.zeros((1, p, self.width), self.dtype)
        if self.posemb == "rope":
            table = rope_table(h, w, self.width // self.num_heads, self.rope_temperature)
            rope = jnp.broadcast_to(jnp.asarray(table), (b, *table.shape))
        else:
            q = self.posemb_prefix
            if self.posemb == "sincos2d":
                init = lambda *_: jnp.asarray(sincos_posemb_2d(self.grid, self.width, q), self.param_dtype)  # noqa: E731
            else:
                init = nn.initializers.normal(stddev=0.02)
            posemb = self.param("pos_embed", init, (1, q + self.grid**2, self.width), self.param_dtype)
            posemb = resample_posemb(posemb, q, h).astype(self.dtype)
            x = x + posemb[:, q:]
            if q:
                prefix_pos = posemb[:, :q]
        if keep_indices is not None:
            x = gather_tokens(x, keep_indices)
            rope = None if rope is None else gather_tokens(rope, keep_indices)

        prefix = self.prefix_tokens()
        if prefix:
            prefix = jnp.concatenate(prefix, axis=1).astype(self.dtype) + prefix_pos
            x = jnp.concatenate([jnp.broadcast_to(prefix, (b, p, self.width)), x], axis=1)
        if self.ln_pre:
            x = nn.LayerNorm(
                epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_pre"
            )(x)

        policy = remat_policy(self.remat_policy)
        block_cls = (
            Block if policy is False else nn.remat(Block, static_argnums=(2, 3, 4, 5, 6), policy=policy)
        )
        drop_rates = np.linspace(0.0, self.drop_path, self.depth)
        attn_logits, cls_attn, qk, hidden = {}, {}, {}, {}
        for layer in range(1, self.depth + 1):
            want_logits, want_cls, want_qk = (
                layer in attn_layers,
                layer in cls_attn_layers,
                layer in qk_layers,
            )
            x, extras = block_cls(
                self.num_heads,
                self.mlp_dim,
                self.act,
                self.qkv_bias,
                self.norm_eps,
                float(drop_rates[layer - 1]),
                self.dtype,
                self.param_dtype,
                self.attn_impl,
                self.fp8,
                self.attn_length_multiple,
                self.layer_scale_init,
                name=f"block{layer}",
            )(x, train, want_logits, want_cls, p, want_qk, rope)
            if want_logits:
                attn_logits[layer] = extras["logits"]
            if want_qk:
                qk[layer] = (extras["q"], extras["k"])
            if want_cls:
                cls_attn[layer] = extras["cls"]
            if layer in hidden_layers:
                hidden[layer] = x
            if layer in drop_after:
                x = jnp.concatenate([x[:, :p], gather_tokens(x[:, p:], drop_after[layer])], axis=1)
                rope = None if rope is None else gather_tokens(rope, drop_after[layer])

        if self.final_norm:
            x = nn.LayerNorm(
                epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
            )(x)
        out: dict[str, Any] = {
            "tokens": x, "attn_logits": attn_logits, "cls_attn": cls_attn, "qk": qk, "hidden": hidden
        }
        if self.pool == "map":
            pooled, out["map_attn"] = MapHead(
                self.num_heads, self.mlp_dim, self.act, self.norm_eps, self.dtype, self.param_dtype,
                name="map_head",
            )(x[:, p:])  # fmt: skip
        else:
            pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x[:, p:], axis=1)
        out["pooled"] = pooled
        out["summary"] = x[:, 0] if self.class_token and self.pool != "map" else pooled
        if self.proj_dim:
            out["embedding"] = out["summary"] = nn.Dense(
                self.proj_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
            )(x[:, 0])
        if self.num_classes:
            out["logits"] = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.zeros,
                name="head",
            )(pooled).astype(jnp.float32)
        return out


# Fields of ``VisionTransformer`` that say how it runs, not what it is; the others describe the
# architecture (saved beside exported weights).
RUNTIME_FIELDS = ("parent", "name", "dtype", "param_dtype", "drop_path", "remat_policy", "fp8",
                  "attn_impl", "attn_length_multiple")  # fmt: skip
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(VisionTransformer) if f.name not in RUNTIME_FIELDS)


def make_vit(arch: Mapping[str, Any], **overrides) -> VisionTransformer:
    """Builds a ViT from an architecture dict (``variant`` 'B/16' expands to width/depth/heads/mlp/patch)."""
    arch = dict(arch)
    variant = arch.pop("variant", None)
    kwargs = decode_variant(variant) if variant else {}
    kwargs.update(arch)
    kwargs.update(overrides)
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(VisionTransformer)}
    if unknown:
        raise ConfigError(f"model: unknown ViT field(s) {sorted(unknown)}; known: {sorted(ARCH_FIELDS)}")
    model = VisionTransformer(**kwargs)
    check_arch(model)
    return model


POSEMBS = ("learn", "sincos2d", "rope")
POOLS = ("cls", "gap", "map")


def check_arch(model: VisionTransformer) -> None:
    """ConfigError naming the field when the architecture's fields contradict each other."""
    if model.posemb not in POSEMBS:
        raise ConfigError(f"model.posemb={model.posemb!r}: expected one of {list(POSEMBS)}")
    if model.pool not in POOLS:
        raise ConfigError(f"model.pool={model.pool!r}: expected one of {list(POOLS)}")
    if model.num_registers < 0:
        raise ConfigError(f"model.num_registers={model.num_registers}: expected >= 0")
    if not model.class_token:
        if model.pool == "cls":
            raise ConfigError("model.pool='cls' reads the CLS token; class_token=False: use 'gap' or 'map'")
        if model.proj_dim:
            raise ConfigError(f"model.proj_dim={model.proj_dim} projects the CLS token; class_token=False")
        if model.dist_token:
            raise ConfigError("model.dist_token=True needs class_token=True (DeiT puts it after the CLS)")
    if model.posemb == "rope" and (model.width // model.num_heads) % 4:
        raise ConfigError(
            f"model.posemb='rope' needs a head dimension divisible by 4; width {model.width} / "
            f"{model.num_heads} heads gives {model.width // model.num_heads}"
        )


def arch_dict(model: VisionTransformer) -> dict[str, Any]:
    """The JSON-serialisable architecture of a ViT (inverse of ``make_vit``)."""
    return {name: getattr(model, name) for name in ARCH_FIELDS}


def add_fp8_scales(model: VisionTransformer, params: Any) -> Any:
    """``params`` of an ``fp8`` model with each block matmul's ``kernel_scale`` (per output channel, from
    the weights as given) added; works on ShapeDtypeStructs too. Needs no data: the scales are what the
    parameters' initialisers compute from the weights on a one-image forward pass."""
    if not model.fp8:
        raise ValueError("add_fp8_scales: the model is not an fp8 model")
    size = model.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    apply = lambda p, x: model.apply({"params": p}, x, mutable=["params"], rngs={"params": jax.random.key(0)})  # noqa: E731
    if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
        return jax.eval_shape(apply, params, images)[1]["params"]
    return jax.jit(apply)(params, jnp.zeros(images.shape, images.dtype))[1]["params"]


def forward_flops(model: VisionTransformer, patches_per_block: Sequence[int], image_size: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image's forward pass at ``image_size``: every patch is
    embedded, then block ``l`` runs on the prefix + ``patches_per_block[l-1]`` tokens (qkv, projection,
    MLP and the two attention products), then the MAP head, the CLIP projection and the head.
    Elementwise work (norms, softmax, activations) is not counted: this is the count MFU is quoted
    against."""
    if len(patches_per_block) != model.depth:
        raise ValueError(f"{len(patches_per_block)} token counts for a ViT of depth {model.depth}")
    d, mlp = model.width, model.mlp_dim
    flops = 2 * (image_size // model.patch_size) ** 2 * model.patch_size**2 * 3 * d
    for patches in patches_per_block:
        n = model.num_prefix + patches
        flops += 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d
    if model.pool == "map":  # keys and values of the last block's patches; query, projection, MLP of one
        flops += 2 * patches_per_block[-1] * (2 * d * d + 2 * d) + 2 * (2 * d * d + 2 * d * mlp)
    flops += 2 * d * (model.proj_dim or 0) + 2 * d * model.num_classes
    return float(flops)

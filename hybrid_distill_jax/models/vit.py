"""A pure-functional Flax (linen) Vision Transformer for students and teachers alike.

One module covers timm ViT/DeiT (incl. the distillation token), MAE encoders, DINO and CLIP visual
towers (``ln_pre``, QuickGELU, ``proj``). The forward pass can

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
    """x [B, N, D], indices [B, K] -> [B, K, D]."""
    return jnp.take_along_axis(x, indices[..., None], axis=1)


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
                extras["cls"] = probs[:, :, 0, num_prefix:]
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


class Block(nn.Module):
    """Pre-LN transformer block."""

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

    @nn.compact
    def __call__(
        self,
        x,
        train: bool = False,
        want_logits: bool = False,
        want_cls: bool = False,
        num_prefix: int = 1,
        want_qk: bool = False,
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
        )
        x = x + DropPath(self.drop_path)(y, deterministic=not train)
        y = MlpBlock(self.mlp_dim, self.act, self.dtype, self.param_dtype, self.fp8, name="mlp")(
            nn.LayerNorm(name="norm2", **norm)(x)
        )
        x = x + DropPath(self.drop_path)(y, deterministic=not train)
        return x, extras


class VisionTransformer(nn.Module):
    """ViT returning a dict of outputs.

    Outputs: ``tokens`` (all tokens after the final norm, prefix first: [B, P+K, D]), ``pooled``,
    ``logits`` (if ``num_classes``), ``embedding`` (CLIP ``proj`` of the CLS token, if ``proj_dim``),
    ``attn_logits`` {layer: fp32 [B, H, N_l, N_l]} for ``attn_layers``, ``cls_attn``
    {layer: fp32 [B, H, K_l]} (CLS -> patch probabilities) for ``cls_attn_layers``, and ``qk``
    {layer: (q / sqrt(Dh), k), each [B, N_l, H, Dh] in ``dtype``} for ``qk_layers``: the logits of any
    token subset, ``einsum('bqhd,bkhd->bhqk', q[:, rows], k[:, cols])``, without the N x N map; and
    ``hidden`` {layer: [B, P+K_l, D] in ``dtype``}, the residual stream after block l (before any drop
    there and before the final norm), for ``hidden_layers``.
    """

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224  # sets the position-embedding grid; other inputs are resampled on the fly
    num_classes: int = 0
    dist_token: bool = False
    ln_pre: bool = False
    final_norm: bool = True
    patch_bias: bool = True
    qkv_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-6
    posemb: str = "learn"  # or "sincos2d" (MAE; initialised fixed, stored as a parameter)
    pool: str = "cls"  # or "gap" (mean of patch tokens) for ``pooled``/``logits``
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
        return 2 if self.dist_token else 1

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

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

        if self.posemb == "sincos2d":
            init = lambda *_: jnp.asarray(sincos_posemb_2d(self.grid, self.width, p), self.param_dtype)  # noqa: E731
        else:
            init = nn.initializers.normal(stddev=0.02)
        posemb = self.param("pos_embed", init, (1, p + self.grid**2, self.width), self.param_dtype)
        posemb = resample_posemb(posemb, p, h).astype(self.dtype)
        x = x + posemb[:, p:]
        if keep_indices is not None:
            x = gather_tokens(x, keep_indices)

        prefix = [self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), self.param_dtype)]
        if self.dist_token:
            prefix.append(
                self.param("dist_token", nn.initializers.normal(1e-6), (1, 1, self.width), self.param_dtype)
            )
        prefix = jnp.concatenate(prefix, axis=1).astype(self.dtype) + posemb[:, :p]
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
                name=f"block{layer}",
            )(x, train, want_logits, want_cls, p, want_qk)
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

        if self.final_norm:
            x = nn.LayerNorm(
                epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
            )(x)
        out: dict[str, Any] = {
            "tokens": x, "attn_logits": attn_logits, "cls_attn": cls_attn, "qk": qk, "hidden": hidden
        }
        pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x[:, p:], axis=1)
        out["pooled"] = pooled
        if self.proj_dim:
            out["embedding"] = nn.Dense(
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
    return VisionTransformer(**kwargs)


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
    MLP and the two attention products), then the CLIP projection and the head. Elementwise work
    (norms, softmax, activations) is not counted: this is the count MFU is quoted against."""
    if len(patches_per_block) != model.depth:
        raise ValueError(f"{len(patches_per_block)} token counts for a ViT of depth {model.depth}")
    d, mlp = model.width, model.mlp_dim
    flops = 2 * (image_size // model.patch_size) ** 2 * model.patch_size**2 * 3 * d
    for patches in patches_per_block:
        n = model.num_prefix + patches
        flops += 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d
    flops += 2 * d * (model.proj_dim or 0) + 2 * d * model.num_classes
    return float(flops)

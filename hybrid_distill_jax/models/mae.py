"""MAE pre-training model (He et al. 2022): a ViT encoder on 25% of the patches and a light decoder.

Used to train the demo's MIM teacher; the encoder's parameters are a plain ``VisionTransformer``'s
(``params['encoder']``), so the trained teacher exports and loads like any other.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from hybrid_distill_jax.models.vit import Block, VisionTransformer, sincos_posemb_2d

Dtype = Any


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch*patch*C] in row-major patch order (the ViT token order)."""
    return rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


class MAE(nn.Module):
    encoder: VisionTransformer
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, keep_indices, train: bool = False):
        """Returns per-patch pixel predictions [B, N, patch*patch*3] for every patch (masked ones matter)."""
        enc = self.encoder(images, keep_indices=keep_indices, train=train)["tokens"]
        b, n_keep = keep_indices.shape
        grid = self.encoder.grid
        n = grid * grid
        p = self.encoder.num_prefix
        x = nn.Dense(
            self.decoder_width, dtype=self.dtype, param_dtype=self.param_dtype, name="decoder_embed"
        )(enc)
        mask_token = self.param(
            "mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_width), self.param_dtype
        )
        full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n, self.decoder_width))
        full = full.at[jnp.arange(b)[:, None], keep_indices].set(x[:, p:])
        x = jnp.concatenate([x[:, :1], full], axis=1)
        posemb = jnp.asarray(sincos_posemb_2d(grid, self.decoder_width, 1), x.dtype)
        x = x + posemb
        for i in range(self.decoder_depth):
            x, _ = Block(
                self.decoder_heads,
                4 * self.decoder_width,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attn_impl=self.encoder.attn_impl,
                attn_length_multiple=self.encoder.attn_length_multiple,
                name=f"decoder_block{i + 1}",
            )(x, train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="decoder_norm")(x)
        out = self.encoder.patch_size**2 * 3
        return nn.Dense(out, dtype=self.dtype, param_dtype=self.param_dtype, name="decoder_pred")(x[:, 1:])


def mae_loss(
    pred: jax.Array, images: jax.Array, patch: int, keep_indices: jax.Array, norm_pix: bool = True
) -> jax.Array:
    """Mean squared error on the masked patches only, targets optionally normalised per patch."""
    target = patchify(images, patch).astype(jnp.float32)
    if norm_pix:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    b, n = per_patch.shape
    masked = jnp.ones((b, n), jnp.float32).at[jnp.arange(b)[:, None], keep_indices].set(0.0)
    return jnp.sum(per_patch * masked) / jnp.maximum(jnp.sum(masked), 1.0)

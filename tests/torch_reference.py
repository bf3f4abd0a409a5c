"""Torch-side references shared by the conversion tests: random weights that make every parameter
matter, timm's tokens and attention probabilities, and ours on the same input."""

from __future__ import annotations

import numpy as np
import torch


def randomize(module, seed: int):
    """Non-trivial random weights: matrices ~ N(0, 1/fan_in), norm scales ~ 1 +- 0.2, biases and tokens
    random, so attention is far from uniform and every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if any(
                t in name
                for t in (
                    "cls_token",
                    "dist_token",
                    "pos_embed",
                    "class_embedding",
                    "positional_embedding",
                    "mask_token",
                    "reg_token",
                    "latent",
                )
            ):
                p.copy_(0.5 * r)
            elif p.ndim >= 2:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])) * 1.5)
            elif leaf == "weight":
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.1 * r)
    return module.eval()


def ours(model, params, x):
    out = model.apply(
        {"params": params}, np.asarray(x.permute(0, 2, 3, 1)), attn_layers=tuple(range(1, model.depth + 1))
    )
    probs = {k: np.asarray(jax_softmax(v)) for k, v in out["attn_logits"].items()}
    return out, probs


def jax_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def timm_reference(m, x):
    """(tokens after the final norm, {layer: attention probs}) from a timm ViT; probs recomputed from the
    attention module's own qkv layer on the input it received."""
    inputs = {}
    hooks = [
        blk.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
        for i, blk in enumerate(m.blocks)
    ]
    with torch.no_grad():
        tokens = m.forward_features(x)
        probs = {}
        for i, blk in enumerate(m.blocks):
            a, h = blk.attn, inputs[i]
            b, n, c = h.shape
            qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            probs[i + 1] = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1).numpy()
    for hk in hooks:
        hk.remove()
    return tokens.numpy(), probs

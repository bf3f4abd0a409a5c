"""Bring your teachers: PyTorch ViT checkpoints <-> our exported Flax models (see docs/CONVERT.md).

``import_checkpoint`` reads a LOCAL timm / DeiT / MAE / DINO / OpenAI CLIP / open_clip file and writes
a ``model.json`` + ``params.msgpack`` directory (``models.io.save_model``) that distillation configs
point teachers at. ``export_timm`` writes one of our exported models as a timm ``VisionTransformer``
state dict. Reading never executes code from a checkpoint (``convert.torch_io``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hybrid_distill_jax.convert import families, torch_io
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models import io as model_io

__all__ = ["import_checkpoint", "export_timm", "timm_state_dict", "families", "torch_io"]


def import_checkpoint(
    family: str,
    input_path: str,
    output_dir: str,
    *,
    image_size: int | None = None,
    heads: int | None = None,
    act: str | None = None,
    norm_eps: float | None = None,
    mean=None,
    std=None,
    log=print,
) -> tuple[Any, Any, dict]:
    """Converts a local checkpoint file into an exported-model directory; returns (model, params, report)."""
    fam = families.get_family(family)
    if act is not None and act not in ("gelu", "gelu_tanh", "quick_gelu"):
        raise ConfigError(f"--act={act!r}: expected gelu, gelu_tanh or quick_gelu")
    sd = torch_io.load_state_dict(input_path, log=log)
    model, params, report = families.import_state_dict(
        family, sd, heads=heads, act=act, norm_eps=norm_eps, image_size=image_size, where=input_path, log=log
    )
    for line in report["dropped"]:
        log(f"dropped {line}")
    if "resampled" in report:
        log(f"resampled {report['resampled']}")
    mean = tuple(mean) if mean else fam.mean
    std = tuple(std) if std else fam.std
    source = {"family": fam.name, "file": os.path.basename(input_path), "dropped": report["dropped"]}
    source.update({k: report[k] for k in ("resampled", "original_image_size") if k in report})
    model_io.save_model(
        output_dir,
        model,
        params,
        mean=mean,
        std=std,
        image_size=model.image_size,
        extra={"converted_from": source},
    )
    n = sum(int(np.prod(np.shape(x))) for x in _leaves(params))
    log(
        f"wrote {output_dir}: {fam.name} ViT width {model.width}, depth {model.depth}, "
        f"heads {model.num_heads}, patch {model.patch_size}, image {model.image_size}, act {model.act}, "
        f"{n:,} parameters "
        f"(heads are not stored in a checkpoint: check {model.num_heads} is right, or pass --heads)"
    )
    return model, params, report


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def timm_state_dict(model, params) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """(state dict for timm's VisionTransformer, timm.create_model kwargs, notes) for one of our models."""
    fam = families.get_family("timm")
    sd = families.from_flax(fam, model, params)
    notes = []
    if model.proj_dim:
        sd.pop("proj")
        notes.append(
            f"dropped the CLIP projection 'proj' [{model.width}, {model.proj_dim}] (timm's ViT has none)"
        )
    if model.ln_pre and model.patch_bias:
        # timm builds its patch embedding without a bias when pre_norm=True: fold ours into pos_embed.
        bias = sd.pop("patch_embed.proj.bias")
        sd["pos_embed"] = sd["pos_embed"].copy()
        sd["pos_embed"][:, model.num_prefix :] += bias
        notes.append("patch bias folded into the patch part of pos_embed (timm's pre_norm ViT has none)")
    elif not model.patch_bias and not model.ln_pre:
        sd["patch_embed.proj.bias"] = np.zeros((model.width,), np.float32)
        notes.append("patch_embed.proj.bias written as zeros (the model has no patch bias)")
    if not model.qkv_bias:
        for i in range(model.depth):
            sd[f"blocks.{i}.attn.qkv.bias"] = np.zeros((3 * model.width,), np.float32)
        notes.append("attn.qkv.bias written as zeros (the model has no qkv bias)")
    ratio = model.mlp_dim / model.width
    if int(model.width * ratio) != model.mlp_dim:
        raise ConfigError(f"mlp_dim {model.mlp_dim} is not expressible as timm's int(width * mlp_ratio)")
    kwargs: dict[str, Any] = dict(
        img_size=model.image_size,
        patch_size=model.patch_size,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=ratio,
        num_classes=model.num_classes,
    )
    if model.ln_pre:
        kwargs["pre_norm"] = True
    if not model.final_norm:
        kwargs["final_norm"] = False
    if model.pool == "gap":
        kwargs.update(global_pool="avg", fc_norm=False)
    if model.act != "gelu":
        kwargs["act_layer"] = model.act  # timm knows 'quick_gelu' and 'gelu_tanh' by name
    if model.norm_eps != 1e-6:
        notes.append(
            f"LayerNorm eps is {model.norm_eps} (timm's default 1e-6): pass "
            f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={model.norm_eps})"
        )
    if model.dist_token:
        notes.append("the model has a distillation token: create a timm deit_*_distilled_* model")
    return sd, kwargs, notes


def export_timm(input_dir: str, output_path: str, *, timm_name: str | None = None, log=print):
    """Writes the exported model in ``input_dir`` as a timm state dict; returns (path, kwargs, name)."""
    model, params, _meta = model_io.load_model(input_dir, field="--input")
    sd, kwargs, notes = timm_state_dict(model, params)
    torch_io.save_state_dict(sd, output_path)
    if timm_name is None:
        timm_name = "deit_base_distilled_patch16_224" if model.dist_token else "vit_base_patch16_224"
    for note in notes:
        log(f"note: {note}")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    loader = (
        f"safetensors.torch.load_file({output_path!r})"
        if output_path.endswith(".safetensors")
        else f"torch.load({output_path!r}, weights_only=True)"
    )
    log(
        f"wrote {output_path} ({len(sd)} tensors). Load it with:\n"
        f"  model = timm.create_model({timm_name!r}, pretrained=False, {args})\n"
        f"  model.load_state_dict({loader}, strict=True)"
    )
    return output_path, kwargs, timm_name

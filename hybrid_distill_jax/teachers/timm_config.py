"""What a timm ``config.json`` says about the weights beside it, in our terms.

timm stores a model as ``model.safetensors`` + ``config.json`` (``{"architecture": ..., "num_classes":
..., "global_pool": ..., "model_args": {...}, "pretrained_cfg": {"tag", "input_size", "mean", "std",
...}}``, written by ``timm.models._hub.save_config_for_hf``). The input mean/std and size come from
``pretrained_cfg``; the head count, LayerNorm eps, activation and ``norm_pre`` come from the
architecture's factory arguments (:data:`ARCHITECTURES`, checked against timm itself in
``tests/integration/test_hub.py``) with ``model_args`` on top, exactly as ``timm.create_model`` combines
them. A value that neither gives stays ``None``: the caller asks for a flag instead of guessing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import ACTIVATIONS, arch_dict, make_vit

_B = dict(embed_dim=768, depth=12, num_heads=12)
_L = dict(embed_dim=1024, depth=24, num_heads=16)
_CLIP = dict(pre_norm=True, norm_eps=1e-5)  # timm: norm_layer=partial(LayerNorm, eps=1e-5)

# timm's factory arguments per architecture (timm/models/vision_transformer.py, deit.py). Unlisted
# ones are timm's VisionTransformer defaults: GELU, LayerNorm eps 1e-6, no norm_pre.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, **_B),
    "vit_large_patch16_224": dict(patch_size=16, **_L),
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(patch_size=16, **_B),
    "vit_base_patch16_clip_224": dict(patch_size=16, **_B, **_CLIP),
    "vit_large_patch14_clip_224": dict(patch_size=14, **_L, **_CLIP),
    "vit_base_patch16_clip_quickgelu_224": dict(patch_size=16, **_B, **_CLIP, act_layer="quick_gelu"),
    "vit_large_patch14_clip_quickgelu_224": dict(patch_size=14, **_L, **_CLIP, act_layer="quick_gelu"),
}
_POOLS = {"token": "cls", "avg": "gap", "": "cls"}
# model_args this module reads
_READ_ARGS = {
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "pre_norm",
    "act_layer",
    "global_pool",
    "img_size",
}
# model_args that only matter for training or that the weights' shapes already fix
_IGNORED_ARGS = {
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
    "dynamic_img_size",
    "dynamic_img_pad",
    "qkv_bias",
    "mlp_ratio",
    "num_classes",
    "final_norm",
}
# model_args we support only at timm's default value (anything else is not our ViT)
_DEFAULT_ONLY = {
    "in_chans": 3,
    "class_token": True,
    "no_embed_class": False,
    "reg_tokens": 0,
    "init_values": None,
    "qk_norm": False,
    "fc_norm": None,
    "pos_embed": "learn",
}


@dataclasses.dataclass(frozen=True)
class TimmSettings:
    """Our ``make_vit``/input fields that a timm config fixes; ``None`` where it does not."""

    architecture: str
    tag: str
    heads: int | None
    act: str | None
    norm_eps: float | None
    pool: str
    mean: tuple | None
    std: tuple | None
    image_size: int | None
    expect: dict  # width / depth / patch_size / ln_pre the weights must show
    notes: tuple = ()

    def check(self, model, image_size: int, where: str) -> None:
        """CheckpointError when the weights (``image_size``: their position grid) contradict the config."""
        got = dict(width=model.width, depth=model.depth, patch_size=model.patch_size, ln_pre=model.ln_pre)
        wrong = [f"{k} {v} (weights: {got[k]})" for k, v in self.expect.items() if got[k] != v]
        if self.image_size and self.image_size != image_size:
            wrong.append(f"input size {self.image_size} (weights' position grid: {image_size})")
        if wrong:
            raise CheckpointError(
                f"{where}: config.json ({self.architecture}) says {', '.join(wrong)}; weights and "
                "config disagree"
            )


def read_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable timm config.json ({e})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CheckpointError(f"{path}: no 'architecture' key (not a timm config.json)")
    return cfg


def settings(cfg: dict, where: str) -> TimmSettings:
    """Maps a timm config (``read_config``) onto our fields, as ``timm.create_model`` would build it."""
    arch = str(cfg["architecture"])
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    model_args = dict(cfg.get("model_args") or {})
    unknown = sorted(set(model_args) - set(_IGNORED_ARGS) - set(_DEFAULT_ONLY) - _READ_ARGS)
    if unknown:
        raise ConfigError(f"{where}: model_args {unknown} of {arch} are not understood by this converter")
    for key, default in _DEFAULT_ONLY.items():
        if key in model_args and model_args[key] != default:
            raise ConfigError(
                f"{where}: {arch} with {key}={model_args[key]!r} is not supported (only {default!r})"
            )
    known = ARCHITECTURES.get(arch)
    args = {**(known or {}), **model_args}
    notes = []
    expect = {}
    for ours, theirs in (("width", "embed_dim"), ("depth", "depth"), ("patch_size", "patch_size")):
        if theirs in args:
            expect[ours] = int(args[theirs])
    if known is not None or "pre_norm" in model_args:
        expect["ln_pre"] = bool(args.get("pre_norm", False))
    act = args.get("act_layer", "gelu" if known is not None else None)
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"{where}: act_layer={act!r} of {arch}: expected one of {sorted(ACTIVATIONS)}")
    tag = str(pcfg.get("tag") or "")
    if act == "gelu" and tag == "openai" and "_clip_" in arch:
        act = "quick_gelu"
        notes.append(
            f"act quick_gelu: OpenAI's CLIP towers were trained with QuickGELU; timm's {arch} computes "
            "GELU (its pretrained_cfg notes: 'natively QuickGELU')"
        )
    norm_eps = args.get("norm_eps", 1e-6 if known is not None else None)
    pool = str(cfg.get("global_pool", args.get("global_pool", "token")))
    if pool not in _POOLS:
        raise ConfigError(f"{where}: global_pool={pool!r} of {arch}: expected one of {sorted(_POOLS)}")
    size = _square(pcfg.get("input_size"), where) or _square(args.get("img_size"), where)
    mean, std = pcfg.get("mean"), pcfg.get("std")
    return TimmSettings(
        architecture=arch,
        tag=tag,
        heads=int(args["num_heads"]) if "num_heads" in args else None,
        act=act or None,
        norm_eps=float(norm_eps) if norm_eps is not None else None,
        pool=_POOLS[pool],
        mean=tuple(float(v) for v in mean) if mean else None,
        std=tuple(float(v) for v in std) if std else None,
        image_size=size,
        expect=expect,
        notes=tuple(notes),
    )


def description(cfg: dict, where: str) -> dict:
    """The ``model.json`` (architecture + input) that converting weights of this config would write,
    read from the config alone: what compiling for a teacher needs when its weights are not here.

    Shapes follow from timm's own rules: a pre-norm (CLIP-style) tower has no patch-embedding bias,
    the MLP is ``mlp_ratio`` (4) times the width, ``num_classes`` sizes the head.
    """
    s = settings(cfg, where)
    if {"width", "depth", "patch_size"} - set(s.expect) or s.heads is None or s.act is None:
        raise ConfigError(
            f"{where}: {s.architecture} is not an architecture this table knows and its model_args do not "
            "give embed_dim, depth, num_heads and patch_size"
        )
    args = dict(cfg.get("model_args") or {})
    width = s.expect["width"]
    ln_pre = bool(s.expect.get("ln_pre", False))
    arch = dict(
        patch_size=s.expect["patch_size"],
        width=width,
        depth=s.expect["depth"],
        num_heads=s.heads,
        mlp_dim=int(width * float(args.get("mlp_ratio", 4.0))),
        image_size=s.image_size or 224,
        num_classes=int(cfg.get("num_classes", args.get("num_classes", 0)) or 0),
        dist_token="distilled" in s.architecture,
        ln_pre=ln_pre,
        patch_bias=not ln_pre,
        qkv_bias=bool(args.get("qkv_bias", True)),
        act=s.act,
        norm_eps=s.norm_eps,
        pool=s.pool,
    )
    arch = arch_dict(make_vit(arch))  # every field, the rest at timm's (and our) defaults
    return {
        "format": model_io.FORMAT,
        "arch": arch,
        "input": {
            "image_size": arch["image_size"],
            "mean": list(s.mean or model_io.IMAGENET_MEAN),
            "std": list(s.std or model_io.IMAGENET_STD),
        },
        "described_from": {"timm": s.architecture, "tag": s.tag},
    }


def _square(size, where: str) -> int | None:
    """timm's input_size [C, H, W] / img_size (int or [H, W]) -> the square side, or None."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    hw = list(size)[-2:]
    if len(hw) != 2 or hw[0] != hw[1]:
        raise ConfigError(f"{where}: input size {size} is not square (our ViT takes square images)")
    return int(hw[0])


def beside(weights_path: str) -> str | None:
    """The timm ``config.json`` next to a weights file, if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), "config.json")
    return path if os.path.isfile(path) else None

"""What a timm ``config.json`` says about the weights beside it, in our terms.

timm stores a model as ``model.safetensors`` + ``config.json`` (``{"architecture": ..., "num_classes":
..., "global_pool": ..., "model_args": {...}, "pretrained_cfg": {"tag", "input_size", "mean", "std",
...}}``, written by ``timm.models._hub.save_config_for_hf``). The input mean/std and size come from
``pretrained_cfg``; the head count, LayerNorm eps, activation, ``norm_pre``, register tokens, LayerScale,
rotary embeddings and the pooling come from the architecture's factory arguments (:data:`ARCHITECTURES`,
checked against timm itself in ``tests/integration/test_hub.py``) with ``model_args`` on top, exactly as
``timm.create_model`` combines them. A value that neither gives stays ``None``: the caller asks for a
flag instead of guessing.

Two timm model classes are understood (:data:`CLASSES`): ``VisionTransformer`` (DeiT, CLIP, MAE, DINO,
DINOv2 with registers, SigLIP), whose state dicts our ``timm`` family reads, and ``Eva`` as timm builds
DINOv3 with it (rotary embeddings, registers, LayerScale), read by our ``dinov3`` family
(:attr:`TimmSettings.family`). C-RADIO is a ``VisionTransformer`` whose stored 128x128 position grid
timm's loader resamples its own way: its architectures convert with a ``radio`` family
(:data:`RADIO_FAMILIES`), whose table's size fixes no input size.

DINOv3's summary: timm's ``Eva`` defaults to ``global_pool='avg'`` (the mean of the patch tokens), which
DINOv3's ``config.json`` files carry, while upstream DINOv3 summarises an image by its CLS token (its
DINO head is trained on it; timm's factories say so: "pass global_pool='token' ... matches upstream").
So a DINOv3 config without a classifier (``num_classes`` 0) converts with ``pool='cls'``; one whose
classifier was trained on ``avg`` keeps the mean (``pool='gap'``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import ACTIVATIONS, arch_dict, make_vit
from hybrid_distill_jax.teachers import families
from hybrid_distill_jax.teachers.families.base import LAYER_SCALE_INIT

_B = dict(embed_dim=768, depth=12, num_heads=12)
_L = dict(embed_dim=1024, depth=24, num_heads=16)
_SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)
_CLIP = dict(pre_norm=True, norm_eps=1e-5)  # timm: norm_layer=partial(LayerNorm, eps=1e-5)
_DINOV2_REG = dict(patch_size=14, init_values=1e-5, reg_tokens=4, no_embed_class=True)
_SIGLIP = dict(class_token=False, global_pool="map")
_DINOV3 = dict(
    patch_size=16,
    dynamic_img_size=True,
    init_values=1e-5,
    rope_type="dinov3",
    rope_temperature=100,
    rope_rotate_half=True,
    use_rot_pos_emb=True,
    use_abs_pos_emb=False,
    num_reg_tokens=4,
    use_fc_norm=False,
    norm_eps=1e-5,
)
_RADIO = dict(patch_size=16, img_size=512, reg_tokens=7, no_embed_class=True, final_norm=False)
_RADIO_V4 = dict(_RADIO, reg_tokens=9)

# timm's factory arguments per architecture (timm/models/vision_transformer.py, deit.py, eva.py), with
# ``norm_eps`` standing for their ``norm_layer=partial(LayerNorm, eps=...)``. Unlisted ones are the
# class's defaults: GELU, LayerNorm eps 1e-6, no norm_pre, a CLS token, no registers, no LayerScale.
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
    "vit_base_patch14_reg4_dinov2": dict(**_B, **_DINOV2_REG),
    "vit_large_patch14_reg4_dinov2": dict(**_L, **_DINOV2_REG),
    "vit_base_patch16_siglip_224": dict(patch_size=16, **_B, **_SIGLIP),
    "vit_base_patch16_siglip_256": dict(patch_size=16, **_B, **_SIGLIP),
    "vit_base_patch16_siglip_384": dict(patch_size=16, **_B, **_SIGLIP),
    "vit_large_patch16_siglip_384": dict(patch_size=16, **_L, **_SIGLIP),
    "vit_so400m_patch14_siglip_224": dict(patch_size=14, **_SO400M, **_SIGLIP),
    "vit_so400m_patch14_siglip_378": dict(patch_size=14, **_SO400M, **_SIGLIP),
    "vit_so400m_patch14_siglip_384": dict(patch_size=14, **_SO400M, **_SIGLIP),
    "vit_base_patch16_dinov3": dict(**_B, **_DINOV3, qkv_bias=False),
    "vit_base_patch16_dinov3_qkvb": dict(**_B, **_DINOV3, qkv_bias=True),
    "vit_large_patch16_dinov3": dict(**_L, **_DINOV3, qkv_bias=False),
    "vit_large_patch16_dinov3_qkvb": dict(**_L, **_DINOV3, qkv_bias=True),
    "vit_base_patch16_radio_v3": dict(**_B, **_RADIO, init_values=1e-5),
    "vit_large_patch16_radio_v3": dict(**_L, **_RADIO, init_values=1e-5),
    "vit_huge_patch16_radio_v3": dict(embed_dim=1280, depth=32, num_heads=16, **_RADIO),
    "vit_giant_patch16_radio_v3": dict(embed_dim=1536, depth=40, num_heads=24, **_RADIO),
    "vit_so400m_patch16_radio_v4": dict(
        embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152, **_RADIO_V4
    ),
    "vit_huge_patch16_radio_v4": dict(embed_dim=1280, depth=32, num_heads=16, **_RADIO_V4),
}
# Our family per C-RADIO architecture: the align_corners its position grid is resampled with, as timm's
# loader does (its _RADIO_ALIGN_CORNERS: C-RADIOv3-B and -H were released resampling with True; v3-L and
# v3-g's code switched to False, v4's uses False).
RADIO_FAMILIES = {
    "vit_base_patch16_radio_v3": "radio_align_corners",
    "vit_large_patch16_radio_v3": "radio",
    "vit_huge_patch16_radio_v3": "radio_align_corners",
    "vit_giant_patch16_radio_v3": "radio",
    "vit_so400m_patch16_radio_v4": "radio",
    "vit_huge_patch16_radio_v4": "radio",
}
_EVA_ARCHITECTURES = {name for name in ARCHITECTURES if "_dinov3" in name}
_DROP_RATES = {
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
}


@dataclasses.dataclass(frozen=True)
class TimmClass:
    """How one timm model class's arguments map onto ours.

    ``read``: the arguments this module turns into our fields; ``ignored``: ones that only matter for
    training or that the weights' shapes fix; ``only``: ones we support at one value, as
    ``{name: (timm's default, the supported values)}``; anything else is refused by name.
    """

    name: str
    family: str  # our family whose key layout the class's state dicts have
    read: frozenset
    ignored: frozenset
    only: dict
    pools: dict  # timm's global_pool -> our pool


CLASSES = {
    "VisionTransformer": TimmClass(
        "VisionTransformer",
        family="timm",
        read=frozenset(
            {
                "embed_dim",
                "depth",
                "num_heads",
                "patch_size",
                "img_size",
                "pre_norm",
                "act_layer",
                "global_pool",
                "class_token",
                "reg_tokens",
                "no_embed_class",
                "init_values",
                "qkv_bias",
                "mlp_ratio",
                "num_classes",
                "final_norm",
            }
        ),
        ignored=frozenset(_DROP_RATES | {"weight_init", "fix_init", "dynamic_img_size", "dynamic_img_pad"}),
        only={
            "in_chans": (3, (3,)),
            "qk_norm": (False, (False,)),
            "scale_attn_norm": (False, (False,)),
            "scale_mlp_norm": (False, (False,)),
            "proj_bias": (True, (True,)),
            "fc_norm": (None, (None, False)),
            "pool_include_prefix": (False, (False,)),
            "pos_embed": ("learn", ("learn",)),
            "embed_norm_layer": (None, (None,)),
        },
        pools={"token": "cls", "avg": "gap", "map": "map", "": "cls"},
    ),
    "Eva": TimmClass(
        "Eva",
        family="dinov3",
        read=frozenset(
            {
                "embed_dim",
                "depth",
                "num_heads",
                "patch_size",
                "img_size",
                "global_pool",
                "num_reg_tokens",
                "init_values",
                "qkv_bias",
                "mlp_ratio",
                "num_classes",
            }
        ),
        ignored=frozenset(
            _DROP_RATES
            | {
                "dynamic_img_size",
                "dynamic_img_pad",
                "head_init_scale",
                # train-time augmentations of the rotary coordinates
                "rope_shift_coords",
                "rope_jitter_coords",
                "rope_rescale_coords",
                # without a position table, whether it covers the prefix tokens does not matter
                "no_embed_class",
            }
        ),
        only={
            "in_chans": (3, (3,)),
            "class_token": (True, (True,)),
            "use_abs_pos_emb": (True, (False,)),
            "use_rot_pos_emb": (False, (True,)),
            "rope_type": ("cat", ("dinov3",)),
            "rope_temperature": (10000.0, (100,)),
            "rope_rotate_half": (False, (True,)),
            "rope_grid_offset": (0.0, (0,)),
            "rope_grid_indexing": ("ij", ("ij",)),
            "rope_mrope_section": (None, (None,)),
            "ref_feat_shape": (None, (None,)),
            "qkv_fused": (True, (True,)),
            "qk_norm": (False, (False,)),
            "num_kv_heads": (None, (None,)),
            "swiglu_mlp": (False, (False,)),
            "swiglu_align_to": (0, (0,)),
            "scale_mlp": (False, (False,)),
            "scale_attn_inner": (False, (False,)),
            "attn_type": ("eva", ("eva",)),
            "attn_only_layer_scale": (False, (False,)),
            "use_post_norm": (False, (False,)),
            "use_pre_transformer_norm": (False, (False,)),
            "use_post_transformer_norm": (None, (None, True)),
            "use_fc_norm": (None, (False,)),
            "attn_pool_num_heads": (None, (None,)),
            "attn_pool_mlp_ratio": (None, (None,)),
        },
        pools={"token": "cls", "avg": "gap", "": "cls"},
    ),
}


def timm_class(architecture: str) -> TimmClass:
    """The timm model class an architecture name is built with (``VisionTransformer`` unless listed)."""
    return CLASSES["Eva" if architecture in _EVA_ARCHITECTURES else "VisionTransformer"]


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
    image_size: int | None  # a multiple of the patch size where that is known (the grid the weights have)
    expect: dict  # width / depth / patch_size / ln_pre / class_token / ... the weights must show
    notes: tuple = ()
    family: str = "timm"  # our family whose layout the state dict has
    timm_class: str = "VisionTransformer"

    def check(self, model, image_size: int, where: str) -> None:
        """CheckpointError when the weights (``image_size``: their position grid) contradict the config."""
        got = dict(
            width=model.width,
            depth=model.depth,
            patch_size=model.patch_size,
            ln_pre=model.ln_pre,
            class_token=model.class_token,
            num_registers=model.num_registers,
            layer_scale=model.layer_scale_init is not None,
            qkv_bias=model.qkv_bias,
        )
        wrong = [f"{k} {v} (weights: {got[k]})" for k, v in self.expect.items() if got[k] != v]
        sized_by_weights = families.get_family(self.family).posemb_resampler is None
        if self.image_size and self.image_size != image_size and sized_by_weights:
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


def _arguments(cfg: dict, where: str) -> tuple[str, TimmClass, dict | None, dict, dict]:
    """(architecture, timm class, its table entry or None, factory args + model_args, model_args), the
    model_args checked against what the class supports."""
    arch = str(cfg["architecture"])
    cls = timm_class(arch)
    model_args = dict(cfg.get("model_args") or {})
    unknown = sorted(set(model_args) - cls.read - cls.ignored - set(cls.only))
    if unknown:
        raise ConfigError(f"{where}: model_args {unknown} of {arch} are not understood by this converter")
    known = ARCHITECTURES.get(arch)
    args = {**(known or {}), **model_args}
    for key, (default, supported) in cls.only.items():
        value = args.get(key, default)
        if value not in supported:
            only = " or ".join(repr(v) for v in supported)
            raise ConfigError(f"{where}: {arch} with {key}={value!r} is not supported (only {only})")
    return arch, cls, known, args, model_args


def settings(cfg: dict, where: str) -> TimmSettings:
    """Maps a timm config (``read_config``) onto our fields, as ``timm.create_model`` would build it."""
    arch, cls, known, args, model_args = _arguments(cfg, where)
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    notes = []
    expect: dict[str, Any] = {}
    for ours, theirs in (("width", "embed_dim"), ("depth", "depth"), ("patch_size", "patch_size")):
        if theirs in args:
            expect[ours] = int(args[theirs])
    described = known is not None
    if described or "pre_norm" in model_args:
        expect["ln_pre"] = bool(args.get("pre_norm", False))
    registers = "num_reg_tokens" if cls.name == "Eva" else "reg_tokens"
    for ours, theirs, default in (
        ("class_token", "class_token", True),
        ("num_registers", registers, 0),
        ("qkv_bias", "qkv_bias", True),
    ):
        if described or theirs in model_args:
            expect[ours] = type(default)(args.get(theirs, default))
    if described or "init_values" in model_args:
        expect["layer_scale"] = args.get("init_values") is not None
    act = args.get("act_layer", "gelu" if described else None)
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"{where}: act_layer={act!r} of {arch}: expected one of {sorted(ACTIVATIONS)}")
    tag = str(pcfg.get("tag") or "")
    if act == "gelu" and tag == "openai" and "_clip_" in arch:
        act = "quick_gelu"
        notes.append(
            f"act quick_gelu: OpenAI's CLIP towers were trained with QuickGELU; timm's {arch} computes "
            "GELU (its pretrained_cfg notes: 'natively QuickGELU')"
        )
    norm_eps = args.get("norm_eps", 1e-6 if described else None)
    pool = _pool(cfg, cls, args, arch, where, notes)
    size = _square(pcfg.get("input_size"), where) or _square(args.get("img_size"), where)
    patch = expect.get("patch_size")
    if size and patch and size % patch:
        notes.append(
            f"input size {size} is not a multiple of the patch size {patch}: timm's patch embedding "
            f"ignores the last {size % patch} px, so the model takes {size - size % patch} px "
            f"({size // patch}x{size // patch} patches)"
        )
        size -= size % patch
    mean, std = pcfg.get("mean"), pcfg.get("std")
    return TimmSettings(
        architecture=arch,
        tag=tag,
        heads=int(args["num_heads"]) if "num_heads" in args else None,
        act=act or None,
        norm_eps=float(norm_eps) if norm_eps is not None else None,
        pool=pool,
        mean=tuple(float(v) for v in mean) if mean else None,
        std=tuple(float(v) for v in std) if std else None,
        image_size=size,
        expect=expect,
        notes=tuple(notes),
        family=RADIO_FAMILIES.get(arch, cls.family),
        timm_class=cls.name,
    )


def _pool(cfg: dict, cls: TimmClass, args: dict, arch: str, where: str, notes: list) -> str:
    """Our ``pool`` for timm's ``global_pool`` (see the module docstring for DINOv3's)."""
    default = "avg" if cls.name == "Eva" else "token"
    pool = str(cfg.get("global_pool", args.get("global_pool", default)))
    if pool not in cls.pools:
        raise ConfigError(
            f"{where}: global_pool={pool!r} of {arch} (timm {cls.name}): expected one of {sorted(cls.pools)}"
        )
    class_token = bool(args.get("class_token", True))
    if pool == "token" and not class_token:
        raise ConfigError(f"{where}: global_pool='token' of {arch} needs a class token (class_token=False)")
    if pool == "" and not class_token:
        return "gap"
    num_classes = int(cfg.get("num_classes", args.get("num_classes", 0)) or 0)
    if cls.name == "Eva" and pool == "avg" and not num_classes:
        notes.append(
            f"pool cls: {arch}'s global_pool 'avg' is timm's Eva default; DINOv3 summarises an image by "
            "its CLS token (no classifier here was trained on the average)"
        )
        return "cls"
    return cls.pools[pool]


def description(cfg: dict, where: str) -> dict:
    """The ``model.json`` (architecture + input) that converting weights of this config would write,
    read from the config alone: what compiling for a teacher needs when its weights are not here.

    Shapes follow from timm's own rules: a pre-norm (CLIP-style) tower has no patch-embedding bias,
    the MLP (and a MAP head's) is ``int(width * mlp_ratio)`` wide, ``num_classes`` sizes the head, a
    position table covers the prefix tokens unless ``no_embed_class``; LayerScale is recorded with the
    initial value the importer records (the weights replace it).
    """
    s = settings(cfg, where)
    if {"width", "depth", "patch_size"} - set(s.expect) or s.heads is None or s.act is None:
        raise ConfigError(
            f"{where}: {s.architecture} is not an architecture this table knows and its model_args do not "
            "give embed_dim, depth, num_heads and patch_size"
        )
    _, cls, _, args, _ = _arguments(cfg, where)
    width, patch = s.expect["width"], s.expect["patch_size"]
    ln_pre = bool(s.expect.get("ln_pre", False))
    eva = cls.name == "Eva"
    class_token = bool(args.get("class_token", True))
    registers = int(args.get("num_reg_tokens" if eva else "reg_tokens", 0))
    dist_token = "distilled" in s.architecture
    prefix = int(class_token) + int(dist_token) + registers
    family = families.get_family(s.family)
    arch = dict(
        patch_size=patch,
        width=width,
        depth=s.expect["depth"],
        num_heads=s.heads,
        mlp_dim=int(width * float(args.get("mlp_ratio", 4.0))),
        image_size=s.image_size or family.image_size,
        num_classes=int(cfg.get("num_classes", args.get("num_classes", 0)) or 0),
        class_token=class_token,
        dist_token=dist_token,
        num_registers=registers,
        ln_pre=ln_pre,
        final_norm=True if eva else bool(args.get("final_norm", True)),
        patch_bias=not ln_pre,
        qkv_bias=bool(args.get("qkv_bias", True)),
        act=s.act,
        norm_eps=s.norm_eps,
        posemb=family.posemb,
        prefix_posemb=eva or not prefix or not args.get("no_embed_class", False),
        layer_scale_init=LAYER_SCALE_INIT if args.get("init_values") is not None else None,
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

"""Key maps between PyTorch ViT state dicts and our Flax ``VisionTransformer`` params, both directions.

A family (one module per family in this package, each registering a :class:`Family`) names a layout
of torch keys; two layouts cover the families here:

* :data:`TIMM_LAYOUT`: timm ``VisionTransformer`` / DeiT (incl. ``dist_token``), official MAE and DINO
  checkpoints (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``norm``).
* :data:`CLIP_LAYOUT`: OpenAI CLIP and open_clip visual towers (``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.attn.in_proj_weight``, ``ln_post``,
  ``proj``), under ``visual.`` in a full CLIP checkpoint.

The architecture is read off the tensor shapes (width, patch size, depth, MLP width, token grid); the
head count cannot be, so it comes from ``--heads`` or :data:`DEFAULT_HEADS`. Every checkpoint key is
either mapped, or dropped by a family rule that is reported (MAE decoder, DeiT ``head_dist``, CLIP
text tower, ...); anything else fails with a :class:`CheckpointError` listing missing keys,
unexpected keys and shape mismatches in the checkpoint's own names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import VisionTransformer, make_vit, resample_posemb

DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


# --------------------------------------------------------------------------------------------------
# Tensor transforms: fwd(torch_array, flax_shape) -> flax array; bwd(flax_array) -> torch array;
# shape(flax_shape) -> torch shape.


@dataclasses.dataclass(frozen=True)
class Kind:
    fwd: Callable[[np.ndarray, tuple], np.ndarray]
    bwd: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple], tuple]


KINDS = {
    "same": Kind(lambda x, s: x, lambda y: y, lambda s: s),
    "dense": Kind(lambda x, s: x.T, lambda y: y.T, lambda s: s[::-1]),
    "conv": Kind(
        lambda x, s: x.transpose(2, 3, 1, 0),
        lambda y: y.transpose(3, 2, 0, 1),
        lambda s: (s[3], s[2], s[0], s[1]),
    ),
    # qkv: torch [3*H*Dh, D] (output index = which*D + head*Dh + d) <-> flax [D, 3, H, Dh]
    "qkv": Kind(
        lambda x, s: x.T.reshape(s),
        lambda y: y.reshape(y.shape[0], -1).T,
        lambda s: (s[1] * s[2] * s[3], s[0]),
    ),
    "qkv_bias": Kind(lambda x, s: x.reshape(s), lambda y: y.reshape(-1), lambda s: (math.prod(s),)),
    # out proj: torch [D, H*Dh] <-> flax [H, Dh, D]
    "out": Kind(
        lambda x, s: x.T.reshape(s), lambda y: y.reshape(-1, y.shape[-1]).T, lambda s: (s[2], s[0] * s[1])
    ),
    # CLIP's class_embedding [D] and positional_embedding [N, D] have no leading batch axis
    "vec_token": Kind(lambda x, s: x.reshape(s), lambda y: y.reshape(-1), lambda s: (s[-1],)),
    "unbatch": Kind(lambda x, s: x.reshape(s), lambda y: y[0], lambda s: tuple(s[1:])),
}


def _ln(src: str, dst: str) -> list:
    return [(f"{src}.weight", f"{dst}/scale", "same"), (f"{src}.bias", f"{dst}/bias", "same")]


def _dense(src: str, dst: str, bias: bool = True) -> list:
    out = [(f"{src}.weight", f"{dst}/kernel", "dense")]
    return out + [(f"{src}.bias", f"{dst}/bias", "same")] if bias else out


@dataclasses.dataclass(frozen=True)
class Layout:
    """The torch names of one state-dict layout. ``block`` is block ``{i}``'s prefix (0-based); the
    per-block names are relative to it; modules (``patch_embed``, norms, ``attn_out``, ``fc1``, ``fc2``)
    hold ``.weight`` and ``.bias``. ``dist_token`` None: the layout has no distillation token."""

    cls_token: tuple[str, str]  # (key, kind)
    pos_embed: tuple[str, str]
    patch_embed: str
    dist_token: str | None
    norm_pre: str
    block: str
    norm1: str
    norm2: str
    qkv_weight: str
    qkv_bias: str
    attn_out: str
    fc1: str
    fc2: str
    norm: str
    what: str  # for messages

    def block_pattern(self) -> str:
        """The regex of any block key, its index captured."""
        head, tail = (re.escape(part) for part in self.block.split("{i}"))
        return rf"^{head}(\d+){tail}\."


TIMM_LAYOUT = Layout(
    cls_token=("cls_token", "same"),
    pos_embed=("pos_embed", "same"),
    patch_embed="patch_embed.proj",
    dist_token="dist_token",
    norm_pre="norm_pre",
    block="blocks.{i}",
    norm1="norm1",
    norm2="norm2",
    qkv_weight="attn.qkv.weight",
    qkv_bias="attn.qkv.bias",
    attn_out="attn.proj",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    norm="norm",
    what="timm ViTs",
)
CLIP_LAYOUT = Layout(
    cls_token=("class_embedding", "vec_token"),
    pos_embed=("positional_embedding", "unbatch"),
    patch_embed="conv1",
    dist_token=None,
    norm_pre="ln_pre",
    block="transformer.resblocks.{i}",
    norm1="ln_1",
    norm2="ln_2",
    qkv_weight="attn.in_proj_weight",
    qkv_bias="attn.in_proj_bias",
    attn_out="attn.out_proj",
    fc1="mlp.c_fc",
    fc2="mlp.c_proj",
    norm="ln_post",
    what="CLIP towers",
)

IMAGENET_INPUT = dict(mean=model_io.IMAGENET_MEAN, std=model_io.IMAGENET_STD)
CLIP_INPUT = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
DEIT_DISTILLATION_HEAD = (r"^head_dist\.", "DeiT distillation head (our ViT keeps one head)")


@dataclasses.dataclass(frozen=True)
class Family:
    """What a checkpoint family's files are and what they leave unsaid.

    ``act``, ``norm_eps``, ``mean`` and ``std`` are the values the family fixes (None: a flag or a timm
    ``config.json`` must give them). A family's quirks are fields, never branches on its name.
    """

    name: str
    layout: Layout
    act: str | None
    norm_eps: float | None
    mean: tuple | None = None
    std: tuple | None = None
    posemb: str = "learn"
    prefix: str = ""  # where the tower lives in a full checkpoint ('visual.' for CLIP); other keys dropped
    wrapper: str = ""  # a prefix every key may carry (a DINO training checkpoint's 'backbone.'), removed
    drop: tuple = ()  # (regex, reason) pairs applied to keys after the prefixes are stripped
    reads_timm_config: bool = False  # settings come from a timm config.json beside the weights, when there
    plain_tower_defaults: bool = False  # act/norm_eps hold for plain towers only, not for pre-norm ones
    defaults_name: str = ""  # how messages name the family's values (default: 'the NAME family')
    help: str = ""

    @property
    def defaults_source(self) -> str:
        return self.defaults_name or f"the {self.name} family"


# Families by name; each module of this package registers its own.
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds ``family`` to :data:`FAMILIES` under its name (one module per family calls this)."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"--family={name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def entries(lay: Layout, model: VisionTransformer) -> list[tuple[str, str, str]]:
    """[(torch key, flax path 'a/b/c', kind)] for every parameter of ``model`` in layout ``lay``."""
    m = model
    e = [
        (lay.cls_token[0], "cls_token", lay.cls_token[1]),
        (lay.pos_embed[0], "pos_embed", lay.pos_embed[1]),
        (f"{lay.patch_embed}.weight", "patch_embed/kernel", "conv"),
    ]
    if m.patch_bias:
        e.append((f"{lay.patch_embed}.bias", "patch_embed/bias", "same"))
    if m.dist_token:
        if lay.dist_token is None:
            raise ConfigError(f"{lay.what} have no distillation token")
        e.append((lay.dist_token, "dist_token", "same"))
    if m.ln_pre:
        e += _ln(lay.norm_pre, "norm_pre")
    for i in range(m.depth):
        s, d = lay.block.format(i=i), f"block{i + 1}"
        e += _ln(f"{s}.{lay.norm1}", f"{d}/norm1") + _ln(f"{s}.{lay.norm2}", f"{d}/norm2")
        e.append((f"{s}.{lay.qkv_weight}", f"{d}/attn/qkv/kernel", "qkv"))
        if m.qkv_bias:
            e.append((f"{s}.{lay.qkv_bias}", f"{d}/attn/qkv/bias", "qkv_bias"))
        e += [
            (f"{s}.{lay.attn_out}.weight", f"{d}/attn/proj/kernel", "out"),
            (f"{s}.{lay.attn_out}.bias", f"{d}/attn/proj/bias", "same"),
        ]
        e += _dense(f"{s}.{lay.fc1}", f"{d}/mlp/fc1") + _dense(f"{s}.{lay.fc2}", f"{d}/mlp/fc2")
    if m.final_norm:
        e += _ln(lay.norm, "norm")
    if m.proj_dim:
        e.append(("proj", "proj/kernel", "same"))  # CLIP's; kept in the timm layout so nothing is lost
    if m.num_classes:
        e += _dense("head", "head")
    return e


def param_shapes(model: VisionTransformer) -> dict[str, tuple]:
    size = model.image_size
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32)))
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
        for path, v in jax.tree_util.tree_leaves_with_path(tree["params"])
    }


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


# --------------------------------------------------------------------------------------------------
# Import: torch state dict -> (arch, params)


def split_keys(family: Family, sd: dict[str, np.ndarray]) -> tuple[dict, list[tuple[str, str]]]:
    """Strips the family's prefix and applies its drop rules; returns (kept, [(key, reason)])."""
    dropped: list[tuple[str, str]] = []
    if family.wrapper and any(k.startswith(family.wrapper) for k in sd):
        sd = {k.removeprefix(family.wrapper): v for k, v in sd.items()}
    if family.prefix and any(k.startswith(family.prefix) for k in sd):
        kept = {}
        for k, v in sd.items():
            if k.startswith(family.prefix):
                kept[k[len(family.prefix) :]] = v
            else:
                dropped.append((k, f"outside the {family.prefix[:-1]} tower"))
        sd = kept
    kept = {}
    for k, v in sd.items():
        reason = next((why for pattern, why in family.drop if re.search(pattern, k)), None)
        if reason:
            dropped.append((k, reason))
        else:
            kept[k] = v
    return kept, dropped


def summarize_dropped(dropped: list[tuple[str, str]]) -> list[str]:
    """One line per reason: 'reason: N keys (a, b, ...)'."""
    by_reason: dict[str, list[str]] = {}
    for k, why in dropped:
        by_reason.setdefault(why, []).append(k)
    lines = []
    for why, keys in by_reason.items():
        heads = sorted({re.sub(r"\.\d+\..*$", ".*", k) for k in keys})
        lines.append(
            f"{why}: {len(keys)} tensor{'s' if len(keys) != 1 else ''} ({', '.join(heads[:8])}"
            f"{', ...' if len(heads) > 8 else ''})"
        )
    return lines


def _require_key(sd: dict, key: str, family: Family) -> np.ndarray:
    if key not in sd:
        sample = ", ".join(sorted(sd)[:8])
        raise CheckpointError(
            f"no {family.prefix}{key} in the checkpoint: it does not look like "
            f"a --family={family.name} ViT ({family.help}). First keys: {sample}"
        )
    return sd[key]


def _count_blocks(sd: dict, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def infer_arch(
    family: Family,
    sd: dict[str, np.ndarray],
    *,
    heads: int | None = None,
    act: str | None = None,
    norm_eps: float | None = None,
) -> dict[str, Any]:
    """The ``make_vit`` arguments that fit ``sd`` (already split by :func:`split_keys`)."""
    lay = family.layout
    conv = _require_key(sd, f"{lay.patch_embed}.weight", family)
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3] or conv.shape[1] != 3:
        raise CheckpointError(f"patch embedding of shape {conv.shape}: expected [width, 3, p, p]")
    width, patch = int(conv.shape[0]), int(conv.shape[2])
    depth = _count_blocks(sd, lay.block_pattern())
    if not depth:
        raise CheckpointError(f"no transformer blocks ({lay.block.format(i='N')}.*) in the checkpoint")
    first = lay.block.format(i=0)
    fc1 = sd.get(f"{first}.{lay.fc1}.weight")
    mlp_dim = int(fc1.shape[0]) if fc1 is not None else 4 * width
    if heads is None:
        if width not in DEFAULT_HEADS:
            raise ConfigError(
                f"width {width}: no default head count for it; pass --heads (defaults: {DEFAULT_HEADS})"
            )
        heads = DEFAULT_HEADS[width]
    if width % heads:
        raise ConfigError(f"--heads={heads} does not divide the width {width}")
    dist = lay.dist_token is not None and lay.dist_token in sd
    num_prefix = 2 if dist else 1
    pos = _require_key(sd, lay.pos_embed[0], family)
    n_patches = pos.shape[-2] - num_prefix
    grid = math.isqrt(max(n_patches, 0))
    if grid * grid != n_patches or pos.shape[-1] != width:
        raise CheckpointError(
            f"position embedding of shape {pos.shape} is not {num_prefix} prefix token(s) + a square grid of "
            f"width {width} (timm models with no_embed_class / register tokens are not supported)"
        )
    arch: dict[str, Any] = dict(
        patch_size=patch,
        width=width,
        depth=depth,
        num_heads=int(heads),
        mlp_dim=mlp_dim,
        image_size=grid * patch,
        dist_token=dist,
        act=act or family.act,
        norm_eps=float(norm_eps) if norm_eps else family.norm_eps,
        posemb=family.posemb,
        patch_bias=f"{lay.patch_embed}.bias" in sd,
        qkv_bias=f"{first}.{lay.qkv_bias}" in sd,
        ln_pre=f"{lay.norm_pre}.weight" in sd,
        final_norm=f"{lay.norm}.weight" in sd,
    )
    if "proj" in sd and sd["proj"].ndim == 2:
        arch["proj_dim"] = int(sd["proj"].shape[1])
    if "head.weight" in sd and sd["head.weight"].ndim == 2:
        arch["num_classes"] = int(sd["head.weight"].shape[0])
    return arch


def check_state_dict(family: Family, model: VisionTransformer, sd: dict[str, np.ndarray], where: str) -> None:
    """CheckpointError listing missing / unexpected / mis-shaped keys, in the checkpoint's own names."""
    shapes = param_shapes(model)
    expected = {
        src: tuple(KINDS[kind].shape(shapes[dst])) for src, dst, kind in entries(family.layout, model)
    }
    header = (
        f"{where} does not fit a --family={family.name} ViT (width {model.width}, "
        f"depth {model.depth}, heads {model.num_heads}, patch {model.patch_size}):"
    )
    actual = {k: tuple(v.shape) for k, v in sd.items()}
    error = model_io.shape_mismatches(header, expected, actual, family.prefix)
    if error is not None:
        raise error


def to_flax(family: Family, model: VisionTransformer, sd: dict[str, np.ndarray]) -> dict:
    shapes = param_shapes(model)
    params: dict = {}
    for src, dst, kind in entries(family.layout, model):
        _set(params, dst, np.ascontiguousarray(KINDS[kind].fwd(sd[src], shapes[dst]), np.float32))
    return params


def from_flax(family: Family, model: VisionTransformer, params: dict, *, prefix: bool = False) -> dict:
    """Our params -> the family's torch state dict (numpy). ``prefix`` adds 'visual.' for CLIP."""
    p = family.prefix if prefix else ""
    return {
        p + src: np.ascontiguousarray(KINDS[kind].bwd(np.asarray(_get(params, dst), np.float32)))
        for src, dst, kind in entries(family.layout, model)
    }


def import_state_dict(
    family_name: str,
    sd: dict[str, np.ndarray],
    *,
    heads: int | None = None,
    act: str | None = None,
    norm_eps: float | None = None,
    image_size: int | None = None,
    pool: str | None = None,
    where: str = "checkpoint",
    log=print,
):
    """Returns (model, params, report) for a loaded state dict; ``pool`` ('cls'/'gap') picks the token
    that ``pooled`` and a classifier head read (the weights cannot tell)."""
    family = get_family(family_name)
    kept, dropped = split_keys(family, sd)
    arch = infer_arch(family, kept, heads=heads, act=act, norm_eps=norm_eps)
    if pool:
        arch["pool"] = pool
    model = make_vit(arch)
    check_state_dict(family, model, kept, where)
    params = to_flax(family, model, kept)
    report: dict[str, Any] = {
        "family": family.name,
        "dropped": summarize_dropped(dropped),
        "num_dropped": len(dropped),
    }
    if image_size and image_size != model.image_size:
        if image_size % model.patch_size:
            raise ConfigError(
                f"--image-size={image_size} is not a multiple of the patch size {model.patch_size}"
            )
        new_grid = image_size // model.patch_size
        params["pos_embed"] = np.asarray(
            resample_posemb(params["pos_embed"], model.num_prefix, new_grid), np.float32
        )
        report["resampled"] = (
            f"position embedding {model.grid}x{model.grid} -> {new_grid}x{new_grid} (bicubic)"
        )
        report["original_image_size"] = model.image_size
        model = make_vit(dict(arch, image_size=image_size))
    return model, params, report

"""Key maps between PyTorch ViT state dicts and our Flax ``VisionTransformer`` params, both directions.

A family (one module per family in this package, each registering a :class:`Family`) names a layout
of torch keys; three layouts cover the families here:

* :data:`TIMM_LAYOUT`: timm ``VisionTransformer`` / DeiT (incl. ``dist_token``), official MAE and DINO
  checkpoints (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``norm``),
  DINOv2 with registers (``reg_token``, ``blocks.{i}.ls1.gamma``) and SigLIP (no ``cls_token``, the MAP
  head ``attn_pool.*``).
* :data:`EVA_LAYOUT`: timm's ``Eva`` port of DINOv3 (``reg_token``, ``blocks.{i}.gamma_1``, no
  ``pos_embed``: rotary embeddings; a qkv bias, where there is one, as ``attn.q_bias`` + ``attn.v_bias``
  with the key bias fixed at zero).
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

# What an imported model records as its LayerScale initial value (timm's ``init_values`` for DINOv2 and
# DINOv3); the weights replace it, so it only matters to a student built from the architecture.
LAYER_SCALE_INIT = 1e-5
DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1152: 16, 1280: 16}


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
    hold ``.weight`` and ``.bias``. ``dist_token`` / ``reg_token`` / ``map_head`` None: the layout has no
    such thing. ``qkv_bias_split`` names the query and value biases of a layout that stores them apart
    (the key bias is zero); ``qkv_bias`` is then the name of the joined bias, which the checkpoint lacks."""

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
    reg_token: str | None = "reg_token"
    layer_scale: tuple[str, str] = ("ls1.gamma", "ls2.gamma")
    map_head: str | None = "attn_pool"
    qkv_bias_split: tuple[str, str] | None = None

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
    reg_token=None,
    map_head=None,
)
EVA_LAYOUT = dataclasses.replace(
    TIMM_LAYOUT,
    dist_token=None,
    layer_scale=("gamma_1", "gamma_2"),
    map_head=None,
    qkv_bias_split=("attn.q_bias", "attn.v_bias"),
    what="timm Eva (DINOv3) ViTs",
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
    image_size: int = 224  # where the weights do not fix it (posemb 'rope', or a posemb_resampler's table)
    prefix: str = ""  # where the tower lives in a full checkpoint ('visual.' for CLIP); other keys dropped
    wrapper: str = ""  # a prefix every key may carry (a DINO training checkpoint's 'backbone.'), removed
    drop: tuple = ()  # (regex, reason) pairs applied to keys after the prefixes are stripped
    reads_timm_config: bool = False  # settings come from a timm config.json beside the weights, when there
    plain_tower_defaults: bool = False  # act/norm_eps hold for plain towers only, not for pre-norm ones
    defaults_name: str = ""  # how messages name the family's values (default: 'the NAME family')
    help: str = ""
    # A stored position table that timm's loader resamples its own way (C-RADIO's), not with our bicubic
    # ``resample_posemb``: fn(patch grid [g, g, D] float32, new g) -> (grid [new g, new g, D], how it was
    # resampled, for the record). Such a table's size fixes no input size: the import always resamples it
    # to ``image_size`` (the argument, else the field above).
    posemb_resampler: Callable[[np.ndarray, int], tuple[np.ndarray, str]] | None = None

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
    e = [(f"{lay.patch_embed}.weight", "patch_embed/kernel", "conv")]
    if m.class_token:
        e.append((lay.cls_token[0], "cls_token", lay.cls_token[1]))
    if m.posemb != "rope":
        e.append((lay.pos_embed[0], "pos_embed", lay.pos_embed[1]))
    if m.num_registers:
        if lay.reg_token is None:
            raise ConfigError(f"{lay.what} have no register tokens")
        e.append((lay.reg_token, "reg_token", "same"))
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
        if m.layer_scale_init is not None:
            for theirs, ours in zip(lay.layer_scale, ("ls1", "ls2")):
                e.append((f"{s}.{theirs}", f"{d}/{ours}/gamma", "same"))
    if m.final_norm:
        e += _ln(lay.norm, "norm")
    if m.pool == "map":
        if lay.map_head is None:
            raise ConfigError(f"{lay.what} have no MAP head")
        h = lay.map_head
        e.append((f"{h}.latent", "map_head/latent", "same"))
        for part in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2"):
            e += _dense(f"{h}.{part}", f"map_head/{part.replace('.', '/')}")
        e += _ln(f"{h}.norm", "map_head/norm")
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
    return _join_qkv_bias(family.layout, kept), dropped


def _join_qkv_bias(lay: Layout, sd: dict) -> dict:
    """A layout's separate query and value biases as one qkv bias (key part zero), under ``lay.qkv_bias``."""
    if lay.qkv_bias_split is None:
        return sd
    q_name, v_name = lay.qkv_bias_split
    out = dict(sd)
    for key in sd:
        if key.endswith("." + q_name):
            block = key[: -len(q_name) - 1]
            q, v = out.pop(key), out.pop(f"{block}.{v_name}", None)
            if v is None:
                raise CheckpointError(f"{key} without {block}.{v_name} in the checkpoint")
            out[f"{block}.{lay.qkv_bias}"] = np.concatenate([q, np.zeros_like(q), v])
    return out


def _split_qkv_bias(lay: Layout, sd: dict) -> dict:
    """The inverse of ``_join_qkv_bias``; a non-zero key bias has no place in the layout."""
    if lay.qkv_bias_split is None:
        return sd
    q_name, v_name = lay.qkv_bias_split
    out = dict(sd)
    for key in sd:
        if key.endswith("." + lay.qkv_bias):
            block = key[: -len(lay.qkv_bias) - 1]
            q, k, v = np.split(out.pop(key), 3)
            if np.any(k):
                raise ConfigError(
                    f"{block}: the model has a non-zero key bias, which {lay.what} do not store (only "
                    f"{q_name} and {v_name})"
                )
            out[f"{block}.{q_name}"], out[f"{block}.{v_name}"] = q, v
    return out


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
            f"a --family={family.name} ViT ({family.help}){_fits_elsewhere(sd, family)}. First keys: {sample}"
        )
    return sd[key]


def _fits_elsewhere(sd: dict, family: Family) -> str:
    """'; its keys fit --family A or B (LAYOUT with FEATURES)' naming every other registered family whose
    layout takes exactly these keys, or '' when none does.

    Only key names are compared (the head count is not stored, and shapes are what a wrong size, not a
    wrong family, gets wrong). A family is tried only when the keys its ``infer_arch`` requires exist, so
    probing never raises (nor recurses into ``_require_key``)."""
    fits: dict[str, list[str]] = {}
    for other in FAMILIES.values():
        if other.name == family.name:
            continue
        lay = other.layout
        try:
            kept, _ = split_keys(other, sd)
        except CheckpointError:
            continue
        needed = [f"{lay.patch_embed}.weight"] + ([] if other.posemb == "rope" else [lay.pos_embed[0]])
        if any(k not in kept for k in needed):
            continue
        try:
            arch = infer_arch(other, kept, heads=1, act="gelu", norm_eps=1e-6)
            keys = {src for src, _, _ in entries(lay, make_vit(arch))}
        except (CheckpointError, ConfigError):
            continue
        if keys == set(kept):
            fits.setdefault(f"{lay.what}{_features(arch)}", []).append(other.name)
    if not fits:
        return ""
    groups = []
    for what, names in fits.items():
        names = sorted(names)
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        groups.append(f"--family {listed} ({what})")
    return "; its keys fit " + "; or ".join(groups)


def _features(arch: dict) -> str:
    """' with A, B and C': what sets an inferred architecture apart from a plain CLS-token ViT."""
    found = [
        text
        for text, present in (
            ("no CLS token", not arch.get("class_token", True)),
            (f"{arch.get('num_registers')} register tokens", arch.get("num_registers")),
            ("a distillation token", arch.get("dist_token")),
            ("LayerScale", arch.get("layer_scale_init") is not None),
            ("a MAP head", arch.get("pool") == "map"),
            ("rotary position embeddings", arch.get("posemb") == "rope"),
            ("a position table for the patches alone", arch.get("prefix_posemb") is False),
            ("a pre-norm", arch.get("ln_pre")),
        )
        if present
    ]
    if not found:
        return ""
    return " with " + (found[0] if len(found) == 1 else f"{', '.join(found[:-1])} and {found[-1]}")


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
    class_token = lay.cls_token[0] in sd
    registers = sd.get(lay.reg_token) if lay.reg_token else None
    num_registers = int(registers.shape[1]) if registers is not None and registers.ndim == 3 else 0
    num_prefix = int(class_token) + int(dist) + num_registers
    arch: dict[str, Any] = dict(
        patch_size=patch,
        width=width,
        depth=depth,
        num_heads=int(heads),
        mlp_dim=mlp_dim,
        class_token=class_token,
        dist_token=dist,
        num_registers=num_registers,
        act=act or family.act,
        norm_eps=float(norm_eps) if norm_eps else family.norm_eps,
        posemb=family.posemb,
        patch_bias=f"{lay.patch_embed}.bias" in sd,
        qkv_bias=f"{first}.{lay.qkv_bias}" in sd,
        ln_pre=f"{lay.norm_pre}.weight" in sd,
        final_norm=f"{lay.norm}.weight" in sd,
    )
    if f"{first}.{lay.layer_scale[0]}" in sd:
        arch["layer_scale_init"] = LAYER_SCALE_INIT
    if lay.map_head and f"{lay.map_head}.latent" in sd:
        arch["pool"] = "map"
    elif not class_token:
        arch["pool"] = "gap"  # without a CLS token or a MAP head, the mean of the patches is what is left
    if family.posemb == "rope":
        arch["image_size"] = family.image_size
    else:
        pos = _require_key(sd, lay.pos_embed[0], family)
        n = pos.shape[-2]
        with_prefix, without = math.isqrt(max(n - num_prefix, 0)), math.isqrt(n)
        if with_prefix * with_prefix == n - num_prefix and pos.shape[-1] == width:
            grid = with_prefix
        elif without * without == n and pos.shape[-1] == width:
            grid, arch["prefix_posemb"] = without, False
        else:
            raise CheckpointError(
                f"position embedding of shape {pos.shape} is neither {num_prefix} prefix token(s) + a square "
                f"grid nor a square grid alone, of width {width}"
            )
        arch["image_size"] = grid * patch
    if "proj" in sd and sd["proj"].ndim == 2:
        arch["proj_dim"] = int(sd["proj"].shape[1])
    if "head.weight" in sd and sd["head.weight"].ndim == 2:
        arch["num_classes"] = int(sd["head.weight"].shape[0])
    return arch


def check_state_dict(family: Family, model: VisionTransformer, sd: dict[str, np.ndarray], where: str) -> None:
    """CheckpointError listing missing / unexpected / mis-shaped keys, in the checkpoint's own names; when
    the keys are exactly another family's, one line naming that family instead."""
    shapes = param_shapes(model)
    expected = {
        src: tuple(KINDS[kind].shape(shapes[dst])) for src, dst, kind in entries(family.layout, model)
    }
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        elsewhere = _fits_elsewhere(sd, family)
        if elsewhere:
            parts = [
                f"{len(keys)} {what} key{'s' if len(keys) != 1 else ''} "
                f"({', '.join(family.prefix + k for k in keys[:4])}{', ...' if len(keys) > 4 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ]
            raise CheckpointError(
                f"{where} is not a --family={family.name} checkpoint ({family.help}): "
                f"{' and '.join(parts)}{elsewhere}"
            )
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
    sd = {
        src: np.ascontiguousarray(KINDS[kind].bwd(np.asarray(_get(params, dst), np.float32)))
        for src, dst, kind in entries(family.layout, model)
    }
    return {p + k: v for k, v in _split_qkv_bias(family.layout, sd).items()}


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
    if family.posemb_resampler is not None and "pos_embed" in params:
        model, params = _own_resampling(family, arch, model, params, image_size or family.image_size, report)
    elif image_size and image_size != model.image_size:
        if image_size % model.patch_size:
            raise ConfigError(
                f"--image-size={image_size} is not a multiple of the patch size {model.patch_size}"
            )
        new_grid = image_size // model.patch_size
        if "pos_embed" in params:
            params["pos_embed"] = np.asarray(
                resample_posemb(params["pos_embed"], model.posemb_prefix, new_grid), np.float32
            )
            report["resampled"] = (
                f"position embedding {model.grid}x{model.grid} -> {new_grid}x{new_grid} (bicubic)"
            )
            report["original_image_size"] = model.image_size
        model = make_vit(dict(arch, image_size=image_size))
    return model, params, report


def _own_resampling(
    family: Family, arch: dict, model: VisionTransformer, params: dict, image_size: int, report: dict
) -> tuple[VisionTransformer, dict]:
    """(model, params) for ``image_size``, the position table's patch grid resampled by the family's own
    ``posemb_resampler`` (its prefix entries, if any, kept); what was done goes into ``report``."""
    if image_size % model.patch_size:
        raise ConfigError(f"--image-size={image_size} is not a multiple of the patch size {model.patch_size}")
    new_grid = image_size // model.patch_size
    if new_grid != model.grid:
        table = np.asarray(params["pos_embed"], np.float32)
        q, width = model.posemb_prefix, table.shape[-1]
        grid, how = family.posemb_resampler(table[0, q:].reshape(model.grid, model.grid, width), new_grid)
        patches = np.asarray(grid, np.float32).reshape(1, new_grid * new_grid, width)
        params["pos_embed"] = np.concatenate([table[:, :q], patches], axis=1)
        report["resampled"] = f"position table {model.grid}x{model.grid} -> {new_grid}x{new_grid} ({how})"
    return make_vit(dict(arch, image_size=image_size)), params

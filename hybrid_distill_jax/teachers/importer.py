"""PyTorch ViT checkpoints <-> our exported Flax models (see docs/CONVERT.md).

``import_checkpoint`` reads a LOCAL checkpoint file of one of the families (``teachers.families``) and
writes a ``model.json`` + ``params.msgpack`` directory (``models.io.save_model``) that distillation
configs point teachers at. ``export_timm`` writes one of our exported models as a timm state dict: a
``VisionTransformer``'s, or an ``Eva``'s (timm's DINOv3) for a model with rotary position embeddings.
Reading never executes code from a checkpoint (``teachers.torch_io``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import ACTIVATIONS
from hybrid_distill_jax.teachers import families, timm_config, torch_io


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
    provenance: dict | None = None,
    log=print,
) -> tuple[Any, Any, dict]:
    """Converts a local checkpoint file into an exported-model directory; returns (model, params, report).

    A family that ``reads_timm_config`` (``timm``) takes eps, activation, heads, pooling and mean/std
    from the timm ``config.json`` beside the file when there is one (``teachers.timm_config``); flags
    override it. That config also names the timm model class, hence the key layout: an ``Eva``
    architecture (DINOv3) is converted as the ``dinov3`` family, at the config's input size (rotary
    embeddings leave it to the config).
    ``provenance`` (e.g. the hub repo and commit) is recorded under ``converted_from``.
    """
    fam = families.get_family(family)
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"--act={act!r}: expected one of {', '.join(ACTIVATIONS)}")
    sd = torch_io.load_state_dict(input_path, log=log)
    given = dict(
        heads=heads,
        act=act,
        norm_eps=norm_eps,
        mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None,
    )
    cfg = _timm_config_beside(fam, input_path, log)
    if cfg is not None and cfg.family != fam.name:
        fam = families.get_family(cfg.family)
        log(f"{cfg.architecture} is a timm {cfg.timm_class}: converting it as --family {fam.name}")
    if cfg is not None and cfg.image_size and image_size is None and (
        fam.posemb == "rope" or fam.posemb_resampler is not None
    ):
        image_size = cfg.image_size
    chosen = _settle(fam, sd, given, cfg, input_path, log)
    model, params, report = families.import_state_dict(
        fam.name,
        sd,
        heads=chosen["heads"],
        act=chosen["act"],
        norm_eps=chosen["norm_eps"],
        pool=cfg.pool if cfg else None,
        image_size=image_size,
        where=input_path,
        log=log,
    )
    if cfg:
        grid_size = report.get("original_image_size", model.image_size)
        if fam.posemb == "rope":  # no position table: the weights fix no input size
            grid_size = cfg.image_size or grid_size
        cfg.check(model, grid_size, input_path)
    for line in report["dropped"]:
        log(f"dropped {line}")
    if "resampled" in report:
        log(f"resampled {report['resampled']}")
    source: dict[str, Any] = {
        "family": fam.name,
        "file": os.path.basename(input_path),
        "dropped": report["dropped"],
    }
    if cfg:
        source["timm"] = {"architecture": cfg.architecture, "tag": cfg.tag, "notes": list(cfg.notes)}
    source.update({k: report[k] for k in ("resampled", "original_image_size") if k in report})
    source.update(provenance or {})
    model_io.save_model(
        output_dir,
        model,
        params,
        mean=chosen["mean"],
        std=chosen["std"],
        image_size=model.image_size,
        extra={"converted_from": source},
    )
    n = sum(int(np.prod(np.shape(x))) for x in _leaves(params))
    heads_note = (
        f"heads from {cfg.architecture}'s config"
        if cfg and given["heads"] is None
        else f"heads are not stored in a checkpoint: check {model.num_heads} is right, or pass --heads"
    )
    log(
        f"wrote {output_dir}: {fam.name} ViT width {model.width}, depth {model.depth}, "
        f"heads {model.num_heads}, patch {model.patch_size}, image {model.image_size}, act {model.act}, "
        f"LayerNorm eps {model.norm_eps}, mean {list(chosen['mean'])}, std {list(chosen['std'])}, "
        f"{n:,} parameters ({heads_note})"
    )
    return model, params, report


_FLAGS = {"act": "--act", "norm_eps": "--norm-eps", "mean": "--mean R G B", "std": "--std R G B"}


def _timm_config_beside(fam, input_path: str, log) -> timm_config.TimmSettings | None:
    path = timm_config.beside(input_path) if fam.reads_timm_config else None
    if path is None:
        return None
    try:
        cfg = timm_config.settings(timm_config.read_config(path), path)
    except CheckpointError as e:
        log(f"ignoring {path}: {e}")
        return None
    log(f"reading {path}: timm {cfg.architecture}" + (f".{cfg.tag}" if cfg.tag else ""))
    for note in cfg.notes:
        log(f"note: {note}")
    return cfg


def _settle(fam, sd: dict, given: dict, cfg, where: str, log) -> dict:
    """heads / act / norm_eps / mean / std: a flag, else the timm config.json, else the family's own
    value where the family fixes it; what nothing fixes is a ConfigError naming the flags to pass."""
    pre_norm = "norm_pre.weight" in sd
    if cfg is not None:
        known = dict(heads=cfg.heads, act=cfg.act, norm_eps=cfg.norm_eps, mean=cfg.mean, std=cfg.std)
        source = "config.json"
    else:
        known = dict(mean=fam.mean, std=fam.std)
        if not (fam.plain_tower_defaults and pre_norm):
            known.update(act=fam.act, norm_eps=fam.norm_eps)
        source = fam.defaults_source
    chosen = {}
    for key, value in given.items():
        default = known.get(key)
        if value is not None and default is not None and value != default:
            log(f"note: --{key.replace('_', '-')} {value} overrides {source}'s {default}")
        chosen[key] = value if value is not None else default
    missing = [flag for key, flag in _FLAGS.items() if chosen[key] is None]
    if missing:
        if cfg is not None:
            why = (
                f"the timm config.json beside it names {cfg.architecture!r}, an architecture "
                "teachers.timm_config.ARCHITECTURES does not know, and its model_args do not fix them"
            )
        elif pre_norm:
            why = (
                "a pre-norm (CLIP-style, e.g. timm's vit_*_clip_*) tower records neither its LayerNorm eps, "
                "activation nor input mean/std, and no timm config.json lies beside it"
            )
        else:
            why = (
                "a timm state dict does not record its input mean/std, and no timm config.json lies beside it"
            )
        raise ConfigError(
            f"{where}: {why}: pass {' '.join(missing)} "
            "(the values in the model's timm pretrained_cfg; timm's vit_*_clip_* towers use "
            "--norm-eps 1e-5, OpenAI CLIP weights --act quick_gelu; ImageNet mean/std are "
            "0.485 0.456 0.406 / 0.229 0.224 0.225, augreg/in21k models 0.5 0.5 0.5 / 0.5 0.5 0.5)"
        )
    return chosen


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def timm_state_dict(model, params) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """(state dict, timm.create_model kwargs, notes) for one of our models: timm's ``VisionTransformer``,
    or, for rotary position embeddings, timm's ``Eva`` as its DINOv3 models build it (``default_timm_name``
    names the model the kwargs are meant for)."""
    if model.posemb == "rope":
        return _eva_state_dict(model, params)
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
        sd["pos_embed"][:, model.posemb_prefix :] += bias
        notes.append("patch bias folded into the patch part of pos_embed (timm's pre_norm ViT has none)")
    elif not model.patch_bias and not model.ln_pre:
        sd["patch_embed.proj.bias"] = np.zeros((model.width,), np.float32)
        notes.append("patch_embed.proj.bias written as zeros (the model has no patch bias)")
    if not model.qkv_bias:
        for i in range(model.depth):
            sd[f"blocks.{i}.attn.qkv.bias"] = np.zeros((3 * model.width,), np.float32)
        notes.append("attn.qkv.bias written as zeros (the model has no qkv bias)")
    kwargs = _common_kwargs(model)
    if not model.class_token:
        kwargs["class_token"] = False
    if model.num_registers:
        kwargs["reg_tokens"] = model.num_registers
    if model.num_prefix and not model.prefix_posemb:
        kwargs["no_embed_class"] = True
    if model.layer_scale_init is not None:
        kwargs["init_values"] = model.layer_scale_init
    if model.ln_pre:
        kwargs["pre_norm"] = True
    if not model.final_norm:
        kwargs["final_norm"] = False
    if model.pool == "gap":
        kwargs.update(global_pool="avg", fc_norm=False)
    elif model.pool == "map":
        kwargs["global_pool"] = "map"
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


# timm's DINOv3 models with a plain (not SwiGLU) MLP, by width: the names an Eva export is loaded through.
_EVA_SIZES = {384: "small", 768: "base", 1024: "large"}
_EVA_NORM_EPS = 1e-5  # what those models' norm_layer fixes
_EVA_ROPE_TEMPERATURE = 100.0


def default_timm_name(model) -> str:
    """The timm model whose ``create_model`` takes ``timm_state_dict``'s kwargs and state dict."""
    if model.posemb == "rope":
        size = _EVA_SIZES.get(model.width, "base")
        return f"vit_{size}_patch16_dinov3{'_qkvb' if model.qkv_bias else ''}"
    return "deit_base_distilled_patch16_224" if model.dist_token else "vit_base_patch16_224"


def _common_kwargs(model) -> dict[str, Any]:
    ratio = model.mlp_dim / model.width
    if int(model.width * ratio) != model.mlp_dim:
        raise ConfigError(f"mlp_dim {model.mlp_dim} is not expressible as timm's int(width * mlp_ratio)")
    return dict(
        img_size=model.image_size,
        patch_size=model.patch_size,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=ratio,
        num_classes=model.num_classes,
    )


def _eva_state_dict(model, params) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """A rotary-embedding model in the layout of timm's Eva DINOv3 port (``vit_*_patch16_dinov3[_qkvb]``).

    Eva has no key bias (DINOv3's is zero): a model whose key bias is not zero fails (``from_flax``), as
    one with a MAP head, a distillation token, a non-GELU MLP, or a patch bias under a pre-norm does: Eva
    has no place for any of them, and with no position table there is nothing to fold a patch bias into.
    """
    what = "a rotary-embedding model exports as timm's Eva (DINOv3)"
    if model.act != "gelu":
        raise ConfigError(f"act {model.act!r}: {what}, whose MLP computes GELU")
    if model.ln_pre and model.patch_bias:
        raise ConfigError(f"{what}, whose pre-norm models have no patch bias, and this model has one")
    try:
        sd = families.from_flax(families.get_family("dinov3"), model, params)
    except ConfigError as e:
        raise ConfigError(f"{what}, and {e}") from None
    notes = []
    if model.proj_dim:
        sd.pop("proj")
        notes.append(f"dropped the projection 'proj' [{model.width}, {model.proj_dim}] (timm's Eva has none)")
    if not model.patch_bias and not model.ln_pre:
        sd["patch_embed.proj.bias"] = np.zeros((model.width,), np.float32)
        notes.append("patch_embed.proj.bias written as zeros (the model has no patch bias)")
    if model.layer_scale_init is None:
        # timm.create_model drops kwargs that are None, so init_values=None cannot remove the DINOv3
        # models' LayerScale: a scale of one leaves each branch as it is.
        for i in range(model.depth):
            for name in ("gamma_1", "gamma_2"):
                sd[f"blocks.{i}.{name}"] = np.ones((model.width,), np.float32)
        notes.append("blocks.*.gamma_1/gamma_2 written as ones (the model has no LayerScale)")
    kwargs = _common_kwargs(model)
    # Stated even where the DINOv3 models agree: they replace that model's own model_args.
    kwargs.update(
        qkv_bias=model.qkv_bias,
        num_reg_tokens=model.num_registers,
        global_pool={"cls": "token", "gap": "avg"}[model.pool],
    )
    if model.layer_scale_init is not None:
        kwargs["init_values"] = model.layer_scale_init
    if not model.class_token:
        kwargs["class_token"] = False
    if model.rope_temperature != _EVA_ROPE_TEMPERATURE:
        kwargs["rope_temperature"] = model.rope_temperature
    if model.ln_pre:
        kwargs["use_pre_transformer_norm"] = True
    if not model.final_norm:
        kwargs["use_post_transformer_norm"] = False
    if model.norm_eps != _EVA_NORM_EPS:
        notes.append(
            f"LayerNorm eps is {model.norm_eps} (timm's DINOv3 models use {_EVA_NORM_EPS}): pass "
            f"norm_layer=functools.partial(timm.layers.LayerNorm, eps={model.norm_eps})"
        )
    return sd, kwargs, notes


def export_timm(input_dir: str, output_path: str, *, timm_name: str | None = None, log=print):
    """Writes the exported model in ``input_dir`` as a timm state dict; returns (path, kwargs, name)."""
    model, params, _meta = model_io.load_model(input_dir, field="--input")
    sd, kwargs, notes = timm_state_dict(model, params)
    torch_io.save_state_dict(sd, output_path)
    if timm_name is None:
        timm_name = default_timm_name(model)
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

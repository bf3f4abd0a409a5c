"""Exported models: ``model.json`` (architecture + input normalisation) beside ``params.msgpack``.

This is the format teachers are loaded from (trained here or converted from PyTorch) and the format
the trainer exports students in.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import numpy as np

from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models.vit import ARCH_FIELDS, VisionTransformer, arch_dict, make_vit

FORMAT = "hybrid_distill_jax.vit/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def save_model(
    directory: str,
    model: VisionTransformer,
    params: Any,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    image_size: int | None = None,
    extra: dict | None = None,
) -> str:
    """Writes params (as fp32 numpy) and a JSON description; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    meta = {
        "format": FORMAT,
        "arch": arch_dict(model),
        "input": {"image_size": int(image_size or model.image_size), "mean": list(mean), "std": list(std)},
        **(extra or {}),
    }
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tmp = os.path.join(directory, "params.msgpack.tmp")
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(host))
    os.replace(tmp, os.path.join(directory, "params.msgpack"))
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return directory


def read_model_json(directory: str, field: str = "checkpoint") -> dict:
    path = os.path.join(directory or "", "model.json")
    if not directory or not os.path.isfile(path):
        raise ConfigError(
            f"{field}={directory!r}: no model.json there (expected an exported or converted model)"
        )
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: {path} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or set(meta.get("arch", {})) - set(ARCH_FIELDS):
        raise ConfigError(f"{field}: {path} is not a {FORMAT} description")
    return meta


def load_model(
    directory: str, *, field: str = "checkpoint", **overrides
) -> tuple[VisionTransformer, Any, dict]:
    """Returns (module, params, meta); params are checked key by key against the architecture."""
    meta = read_model_json(directory, field)
    model = make_vit(meta["arch"], **overrides)
    with open(os.path.join(directory, "params.msgpack"), "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())
    size = model.image_size
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32)))
    check_params(expected["params"], params, where=directory)
    return model, params, meta


def check_params(expected: Any, actual: Any, where: str) -> None:
    """Raises CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    exp = {
        "/".join(str(getattr(k, "key", k)) for k in path): v.shape
        for path, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    act = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.shape(v)
        for path, v in jax.tree_util.tree_leaves_with_path(actual)
    }
    missing = sorted(set(exp) - set(act))
    unexpected = sorted(set(act) - set(exp))
    shapes = sorted(f"{k}: expected {exp[k]}, got {act[k]}" for k in set(exp) & set(act) if exp[k] != act[k])
    if missing or unexpected or shapes:
        lines = [f"parameters in {where} do not fit the architecture:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
        raise CheckpointError("\n".join(lines))

"""Exported models: ``model.json`` (architecture + input normalisation) beside ``params.msgpack``.

This is the format teachers are loaded from (trained here or converted from PyTorch) and the format
the trainer exports students in. Only directories are read here; names on a hub are the teachers'
business (``teachers.resolve``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import numpy as np

from hybrid_distill_jax.errors import CheckpointError, ConfigError, read_bytes, write_atomically
from hybrid_distill_jax.models.vit import ARCH_FIELDS, VisionTransformer, arch_dict, make_vit

FORMAT = "hybrid_distill_jax.vit/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    write_atomically(os.path.join(directory, "params.msgpack"), flax.serialization.msgpack_serialize(host))
    write_atomically(os.path.join(directory, "model.json"), json.dumps(meta, indent=2).encode())
    return directory


def read_model_json(directory: str, field: str = "checkpoint") -> dict:
    """The description of an exported model; ConfigError naming the file and what is wrong with it."""
    path = os.path.join(directory or "", "model.json")
    if not directory or not os.path.exists(path):
        raise ConfigError(
            f"{field}={directory!r}: no model.json there ({path} is missing; expected an exported or "
            "converted model)"
        )
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path} ({e.strerror})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: empty, cut short, binary
        raise ConfigError(f"{field}: {path} is not valid JSON ({_first_line(e)})") from None
    meta = meta if isinstance(meta, dict) else {}
    arch, inputs = meta.get("arch"), meta.get("input")
    if (
        meta.get("format") != FORMAT
        or not isinstance(arch, dict)
        or set(arch) - set(ARCH_FIELDS)
        or not isinstance(inputs, dict)
        or {"image_size", "mean", "std"} - set(inputs)
    ):
        raise ConfigError(f"{field}: {path} is not a {FORMAT} description")
    return meta


def load_model(
    directory: str, *, field: str = "checkpoint", **overrides
) -> tuple[VisionTransformer, Any, dict]:
    """Returns (module, params, meta); params are checked key by key against the architecture."""
    meta = read_model_json(directory, field)
    model = make_vit(meta["arch"], **overrides)
    params = read_params(os.path.join(directory, "params.msgpack"), field)
    check_token_fields(model, params, f"{field}: {os.path.join(directory, 'model.json')}")
    size = model.image_size
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32)))
    check_params(expected["params"], params, where=directory)
    return model, params, meta


def read_params(path: str, field: str = "checkpoint") -> dict:
    """The parameter tree in a ``params.msgpack``; CheckpointError naming the file and what is wrong."""
    data = read_bytes(path, CheckpointError, field)
    try:
        params = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack and flax's array decoding raise many types on damaged bytes
        raise CheckpointError(
            f"{field}: {path} is not a readable parameter file (empty, cut short or damaged: "
            f"{type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(params, dict) or not params:
        raise CheckpointError(f"{field}: {path} holds a {type(params).__name__}, not a parameter tree")
    return params


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def shape_mismatches(header: str, expected: dict, actual: dict, prefix: str = "") -> CheckpointError | None:
    """A CheckpointError listing missing, unexpected and mis-shaped names ({name: shape} each), or None."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    shapes = sorted(
        f"{k}: expected {tuple(expected[k])}, got {tuple(actual[k])}"
        for k in set(expected) & set(actual)
        if tuple(expected[k]) != tuple(actual[k])
    )
    if not (missing or unexpected or shapes):
        return None
    lines = [header]
    if missing:
        lines.append(f"  missing ({len(missing)}): {', '.join(prefix + k for k in missing[:20])}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {', '.join(prefix + k for k in unexpected[:20])}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {'; '.join(prefix + w for w in shapes[:20])}")
    return CheckpointError("\n".join(lines))


def check_token_fields(model: VisionTransformer, params: Any, where: str) -> None:
    """One-line CheckpointError when ``model.json``'s token fields (``num_registers``, ``class_token``, a
    MAP head, LayerScale) disagree with what the parameters hold, before ``check_params``'s key-by-key
    listing: such a disagreement is one wrong field, not dozens of wrong keys."""
    held = params.get("reg_token")
    registers = int(np.shape(held)[1]) if held is not None and np.ndim(held) == 3 else 0
    if registers != model.num_registers:
        raise CheckpointError(
            f"{where} says num_registers={model.num_registers}, params.msgpack holds {registers} register "
            "tokens"
        )
    for field, stated, present, param in (
        ("class_token", model.class_token, "cls_token" in params, "cls_token"),
        ("pool", model.pool == "map", "map_head" in params, "map_head"),
        ("layer_scale_init", model.layer_scale_init is not None, "ls1" in params.get("block1", {}), "ls1"),
    ):
        if stated != present:
            value = repr(getattr(model, field))
            holds = "holds" if present else "has no"
            raise CheckpointError(f"{where} says {field}={value}, params.msgpack {holds} {param}")


def check_params(expected: Any, actual: Any, where: str) -> None:
    """Raises CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    exp = {name(path): v.shape for path, v in jax.tree_util.tree_leaves_with_path(expected)}
    act = {name(path): np.shape(v) for path, v in jax.tree_util.tree_leaves_with_path(actual)}
    error = shape_mismatches(f"parameters in {where} do not fit the architecture:", exp, act)
    if error is not None:
        raise error

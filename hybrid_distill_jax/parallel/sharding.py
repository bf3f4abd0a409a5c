"""Device mesh and parameter sharding rules.

The mesh has three named axes, sized by ``config.mesh``:

* ``data``  -- pure data parallelism (parameters replicated along it);
* ``fsdp``  -- data parallelism whose members also split parameters and optimizer state (ZeRO-3 style:
  XLA all-gathers a weight before use and reduce-scatters its gradient);
* ``model`` -- tensor parallelism inside the transformer blocks (Megatron layout: qkv/fc1 split by
  output, proj/fc2 by input), for models whose layers are too wide for one chip.

The batch is split over ``('data', 'fsdp')`` and replicated along ``model``. Which parameters are
split is decided per leaf from its path (``params/student/block3/mlp/fc1/kernel``,
``opt_state/1/0/mu/student/...``, ``teachers/mae/...``) and shape:

1. the first matching user rule (``config.sharding.rules``: ``'REGEX=SPEC'``, SPEC being ``replicated``
   or one comma-separated entry per dimension: an axis name, ``None``, or axes joined by ``+``);
2. otherwise the tensor-parallel layout above when ``mesh.model > 1``;
3. then, under the ``fsdp`` strategy, the largest dimension still unsplit and divisible by ``mesh.fsdp``
   is split over ``fsdp`` (leaves smaller than ``sharding.fsdp_min_size`` elements stay replicated).

This module imports nothing from the rest of the package but ``errors`` (the benchmark uses it on
machines without TensorFlow or ml_collections).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_distill_jax.errors import ConfigError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("replicated", "fsdp")

# Megatron-style tensor parallelism for the ViT blocks: (path suffix, dimension split over 'model').
# qkv kernel [D, 3, H, Dh] / bias [3, H, Dh]: by head; proj kernel [H, Dh, D]: by head;
# fc1 kernel [D, M] / bias [M]: by hidden unit; fc2 kernel [M, D]: by hidden unit.
TENSOR_PARALLEL = (
    ("attn/qkv/kernel", 2),
    ("attn/qkv/bias", 1),
    ("attn/proj/kernel", 0),
    ("mlp/fc1/kernel", 1),
    ("mlp/fc1/bias", 0),
    ("mlp/fc2/kernel", 0),
)


# ---- mesh ------------------------------------------------------------------------------------------
def resolve_mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> dict[str, int]:
    """{'data': d, 'fsdp': f, 'model': m} with d*f*m == num_devices; one size may be -1 (the rest)."""
    unknown = sorted(set(mesh_cfg) - set(AXES) - {"num_devices"})
    if unknown:
        raise ConfigError(f"mesh: unknown field(s) {unknown}; the mesh axes are {list(AXES)} (+ num_devices)")
    sizes = {axis: mesh_cfg.get(axis, 1) for axis in AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or size >= 1):
            raise ConfigError(
                f"mesh.{axis}={size!r}: expected a positive int, or -1 for all remaining devices"
            )
    free = [axis for axis, size in sizes.items() if size == -1]
    described = " x ".join(f"mesh.{a}={s}" for a, s in sizes.items())
    if len(free) > 1:
        raise ConfigError(f"{described}: at most one mesh axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"{described}: the fixed axes ({fixed} devices) do not divide the {num_devices} devices; "
                f"use sizes whose product divides {num_devices}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"{described} needs {fixed} devices but {num_devices} are in use; make the product "
            f"{num_devices} (or set one axis to -1)"
        )
    return sizes


def mesh_devices(mesh_cfg: Mapping[str, Any]) -> list:
    """The devices the mesh spans: all of them, or the first ``mesh.num_devices`` (single process only)."""
    devices = jax.devices()
    n = mesh_cfg.get("num_devices", 0) or 0
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"mesh.num_devices={n!r}: expected 0 (all devices) or a positive int")
    if n:
        if jax.process_count() > 1:
            raise ConfigError(
                f"mesh.num_devices={n}: a mesh over a subset of devices is for single-process runs; "
                "set mesh.num_devices=0"
            )
        if n > len(devices):
            raise ConfigError(f"mesh.num_devices={n}: only {len(devices)} devices are visible")
        devices = devices[:n]
    return devices


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence | None = None) -> jax.sharding.Mesh:
    """The mesh over ``devices`` (default: ``mesh_devices``; a deviceless compile passes its target's)."""
    devices = mesh_devices(mesh_cfg) if devices is None else list(devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'), replicated along 'model'."""
    return NamedSharding(mesh, P(BATCH_AXES))


# ---- rules -----------------------------------------------------------------------------------------
def parse_spec(text: str, field: str = "sharding.rules") -> P:
    """A SPEC string as a PartitionSpec.

    'replicated' -> P(); 'fsdp,None' -> P('fsdp', None); 'data+fsdp,model' -> P(('data', 'fsdp'), 'model').
    """
    text = text.strip()
    if text in ("replicated", ""):
        return P()
    entries = []
    for part in text.split(","):
        part = part.strip()
        if part in ("None", "none", "_"):
            entries.append(None)
            continue
        axes = tuple(a.strip() for a in part.split("+"))
        for a in axes:
            if a not in AXES:
                raise ConfigError(f"{field}: {a!r} in {text!r} is not a mesh axis; use one of {list(AXES)}")
        entries.append(axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def parse_rules(rules: Sequence[str] | None, field: str = "sharding.rules") -> list[tuple[re.Pattern, P]]:
    """``('REGEX=SPEC', ...)`` -> [(compiled regex, PartitionSpec)], in order (the first match wins)."""
    parsed = []
    for rule in rules or ():
        if not isinstance(rule, str) or "=" not in rule:
            raise ConfigError(
                f"{field}: {rule!r} is not of the form 'REGEX=SPEC' (e.g. 'pos_embed=replicated')"
            )
        pattern, _, spec = rule.rpartition("=")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{field}: {pattern!r} is not a valid regular expression ({e})") from None
        parsed.append((regex, parse_spec(spec, field)))
    return parsed


def path_name(path) -> str:
    """A key path as 'a/b/0/mu/c' (dict keys, sequence indices and attribute names alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axis_size(mesh_shape: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh_shape[n] for n in names)


def leaf_spec(
    name: str,
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    strategy: str = "replicated",
    rules: Sequence[tuple[re.Pattern, P]] = (),
    fsdp_min_size: int = 0,
) -> P:
    """The PartitionSpec of one array, from its path name and shape (see the module docstring)."""
    for regex, spec in rules:
        if regex.search(name):
            if len(spec) > len(shape):
                raise ConfigError(
                    f"sharding.rules: {regex.pattern!r} gives {spec} to {name} of rank {len(shape)}"
                )
            for dim, entry in zip(shape, spec):
                if dim % _axis_size(mesh_shape, entry):
                    raise ConfigError(
                        f"sharding.rules: {regex.pattern!r} splits a dimension of size {dim} of {name} "
                        f"{tuple(shape)} over {entry} ({_axis_size(mesh_shape, entry)} devices), which must "
                        "divide it"
                    )
            return spec
    dims: list[Any] = [None] * len(shape)
    if mesh_shape.get("model", 1) > 1:
        for suffix, dim in TENSOR_PARALLEL:
            if name.endswith(suffix) and dim < len(shape) and shape[dim] % mesh_shape["model"] == 0:
                dims[dim] = "model"
                break
    fsdp = mesh_shape.get("fsdp", 1)
    if strategy == "fsdp" and fsdp > 1 and shape and math.prod(shape) >= fsdp_min_size:
        candidates = [i for i, d in enumerate(shape) if dims[i] is None and d % fsdp == 0]
        if candidates:
            dims[max(candidates, key=lambda i: (shape[i], -i))] = "fsdp"
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def tree_shardings(
    tree: Any,
    mesh: jax.sharding.Mesh,
    strategy: str = "replicated",
    rules: Sequence[str] | None = (),
    fsdp_min_size: int = 0,
    prefix: str = "",
) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs); paths get ``prefix/``."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"sharding strategy {strategy!r}: expected one of {list(STRATEGIES)}")
    parsed = parse_rules(rules)
    mesh_shape = dict(mesh.shape)

    def one(path, leaf):
        name = "/".join(p for p in (prefix, path_name(path)) if p)
        return NamedSharding(
            mesh, leaf_spec(name, np.shape(leaf), mesh_shape, strategy, parsed, fsdp_min_size)
        )

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(abstract_state: Mapping[str, Any], mesh: jax.sharding.Mesh, sharding_cfg: Any) -> dict:
    """Train-state shardings: ``params``, ``opt_state`` and the params' ``ema`` by the rules, everything else
    replicated."""
    cfg = _sharding_fields(sharding_cfg)
    out = {}
    for key, sub in abstract_state.items():
        if key in ("params", "opt_state", "ema"):
            out[key] = tree_shardings(sub, mesh, cfg["student"], cfg["rules"], cfg["fsdp_min_size"], key)
        else:
            out[key] = jax.tree.map(lambda _: NamedSharding(mesh, P()), sub)
    return out


def teacher_shardings(frozen: Any, mesh: jax.sharding.Mesh, sharding_cfg: Any) -> Any:
    """Frozen teacher parameters: replicated by default, split over 'fsdp' on request."""
    cfg = _sharding_fields(sharding_cfg)
    return tree_shardings(frozen, mesh, cfg["teachers"], cfg["rules"], cfg["fsdp_min_size"], "teachers")


def _sharding_fields(sharding_cfg: Any) -> dict:
    get = (lambda k, d: sharding_cfg.get(k, d)) if sharding_cfg is not None else (lambda k, d: d)
    return {
        "student": get("student", "replicated"),
        "teachers": get("teachers", "replicated"),
        "rules": tuple(get("rules", ()) or ()),
        "fsdp_min_size": int(get("fsdp_min_size", 0)),
    }


def describe(shardings: Any, limit: int = 8) -> str:
    """A short summary of which leaves are split, for the log."""
    split = [
        f"{path_name(p)}:{tuple(s.spec)}"
        for p, s in jax.tree_util.tree_leaves_with_path(shardings)
        if isinstance(s, NamedSharding) and any(e is not None for e in s.spec)
    ]
    total = len(jax.tree.leaves(shardings))
    head = ", ".join(split[:limit]) + (", ..." if len(split) > limit else "")
    return f"{len(split)}/{total} leaves split" + (f" ({head})" if split else "")


def to_host(tree: Any) -> Any:
    """numpy copies of a tree on every process, gathering shards that live on other processes."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) or x.is_fully_replicated for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.device_get(multihost_utils.process_allgather(tree, tiled=True))

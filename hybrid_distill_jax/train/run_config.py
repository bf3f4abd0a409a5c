"""The resolved config a run keeps in its workdir (``WORKDIR/config.json``), and the check that a resume
continues the run its checkpoints belong to.

A resume restores the train state as it was saved; if the objective, the models, the data or the
optimizer changed since, the restored state no longer means what the config says (a removed term's head
is silently dropped, a new learning rate applies to moments built under the old one). Such a resume is
refused in one line naming the first changed fields, unless ``config.resume_with_changes=True``. What a
resume may change freely is how the run is observed, saved and laid out (``MAY_CHANGE``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os

import jax

from hybrid_distill_jax import errors
from hybrid_distill_jax.errors import ConfigError

log = logging.getLogger("hybrid_distill_jax")

SAVED = "config.json"
# Dotted field patterns a resume may change: logging, checkpointing, evaluation, export, fault injection,
# devices and sharding, where the data lives, kernels that compute the same values, the override itself.
MAY_CHANGE = (
    "name",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "tensorboard",
    "export_dir",
    "nonfinite_policy",
    "resume_with_changes",
    "eval.*",
    "faults.*",
    "mesh.*",
    "sharding.*",
    "ema.export",
    "data.data_dir",
    "data.prefetch",
    "data.log_example_ids",
    "data.on_corrupt",
    "data.max_unreadable_fraction",
    "data.max_consecutive_unreadable",
    "data.stall_timeout_s",
    "teachers.*.attn_impl",
    "student.attn_impl",
    "model.attn_impl",
)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def _resolved(config) -> dict:
    return json.loads(config.to_json())


def changed_fields(saved: dict, config) -> list[str]:
    """The dotted fields whose values differ between ``saved`` (a ``config.json``) and ``config``, beyond
    ``MAY_CHANGE``, each described ('F added', 'F removed' or 'F: old -> new')."""
    before, now = _flat(saved), _flat(_resolved(config))
    changes = []
    for f in sorted(set(before) | set(now)):
        if before.get(f, "<absent>") == now.get(f, "<absent>"):
            continue
        if any(fnmatch.fnmatchcase(f, pattern) for pattern in MAY_CHANGE):
            continue
        if f not in before:
            changes.append(f"{f} added")
        elif f not in now:
            changes.append(f"{f} removed")
        else:
            changes.append(f"{f}: {json.dumps(before[f])} -> {json.dumps(now[f])}")
    return changes


def has_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_resume(config, workdir: str) -> None:
    """Refuses, in one line, a resume whose config changed what the saved run computes (see the module
    docstring); a workdir without checkpoints, or whose run saved no config, is not checked."""
    path = os.path.join(workdir, SAVED)
    if not has_checkpoints(workdir) or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable saved config of the run being resumed ({e})") from None
    changed = changed_fields(saved, config)
    if not changed:
        return
    if config.get("resume_with_changes", False):
        log.warning("resuming with a changed config (resume_with_changes=True): %s", "; ".join(changed))
        return
    shown = "; ".join(changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise ConfigError(
        f"config: differs from the run being resumed in {workdir} ({shown}{more}; saved in {path}): use "
        "another workdir, or set config.resume_with_changes=True to resume its checkpoint anyway"
    )


def save(config, workdir: str) -> None:
    """Writes the resolved config to ``WORKDIR/config.json`` (process 0; readable, diffable)."""
    if jax.process_index() == 0:
        text = json.dumps(_resolved(config), indent=2, sort_keys=True) + "\n"
        errors.write_atomically(os.path.join(workdir, SAVED), text.encode())

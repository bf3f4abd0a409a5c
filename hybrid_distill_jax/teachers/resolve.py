"""A model reference -> a model directory or its description: the one place where a checkpoint field
is read, for teachers and for every other model a config names (``init_from``, ``model_dir``).

A reference is a directory holding ``model.json`` + ``params.msgpack`` (``models.io``) or a hub name,
``hf-hub:ORG/NAME[@REVISION]`` (``teachers.hub``: fetched, verified and converted once into a cache).
"""

from __future__ import annotations

from typing import Any

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import VisionTransformer
from hybrid_distill_jax.teachers import hub


def resolve(reference: str, field: str = "checkpoint") -> str:
    """The local directory of ``reference``: a hub name is fetched and converted at most once."""
    return hub.resolve(reference, field) if hub.is_hub_name(reference) else reference


def describe(reference: str, field: str = "checkpoint") -> dict:
    """``model.json``'s description of ``reference``, never downloading or converting (for validation
    and deviceless compiles; ``hub.describe``)."""
    if hub.is_hub_name(reference):
        return hub.describe(reference, field)
    return model_io.read_model_json(reference, field)


def describe_for_validation(reference: str, field: str, deviceless: bool) -> dict | None:
    """:func:`describe`, except that a hub name nothing describes yet (no cache, not a known teacher) is
    None, to be checked once it is loaded; a ``deviceless`` compile needs every shape, so there the
    ConfigError stands."""
    try:
        return describe(reference, field)
    except ConfigError:
        if deviceless or not hub.is_hub_name(reference):
            raise
        return None


def load_model(reference: str, field: str = "checkpoint", **overrides) -> tuple[VisionTransformer, Any, dict]:
    """(module, params, meta) of ``reference`` (``models.io.load_model`` of its resolved directory)."""
    return model_io.load_model(resolve(reference, field), field=field, **overrides)

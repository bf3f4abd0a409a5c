"""Checkpoint families, one module each: importing this package registers all of them in ``FAMILIES``.

A new family is one module here that calls :func:`register` with a :class:`Family` (its layout, what it
fixes, the keys it drops); ``base`` holds the key mapping every family shares.
"""

from hybrid_distill_jax.registry import import_submodules
from hybrid_distill_jax.teachers.families.base import (
    FAMILIES,
    Family,
    from_flax,
    get_family,
    import_state_dict,
    infer_arch,
    register,
)

import_submodules(__name__, __path__)

__all__ = ["FAMILIES", "Family", "from_flax", "get_family", "import_state_dict", "infer_arch", "register"]

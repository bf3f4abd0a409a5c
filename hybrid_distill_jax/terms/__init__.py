"""Named loss terms of the distillation objective, by kind (``terms.base``: the interface and registry).

Importing the package imports every module in it, so each kind registers itself: a new kind is one
module here with a ``@register``-ed ``Term`` subclass, and nothing else to edit.
"""

from hybrid_distill_jax.registry import import_submodules
from hybrid_distill_jax.terms.base import (
    TERMS,
    Term,
    TermInputs,
    build_term,
    loss_aware_keep,
    term_class,
    term_config,
)
from hybrid_distill_jax.terms.target_norm import NormalizedTargets

import_submodules(__name__, __path__)

__all__ = [
    "TERMS",
    "NormalizedTargets",
    "Term",
    "TermInputs",
    "loss_aware_keep",
    "build_term",
    "term_class",
    "term_config",
]

"""Named loss terms of the distillation objective, by kind (``terms.base``: the interface and registry).

Importing the package imports every module in it, so each kind registers itself: a new kind is one
module here with a ``@register``-ed ``Term`` subclass, and nothing else to edit.
"""

import importlib
import pkgutil

from hybrid_distill_jax.terms.base import TERMS, Term, TermInputs, build_term, term_class, term_config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TERMS", "Term", "TermInputs", "build_term", "term_class", "term_config"]

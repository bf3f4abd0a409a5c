"""The one way an extension registers itself: a module dropped into a registry's package.

Each extension point (term kinds, masking plans, data formats, teacher families) is a package whose
``__init__`` calls :func:`import_submodules`; every module in it is imported, and its decorator adds it
to the registry. A new extension is therefore one file, and no list of modules exists to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Imports every module directly inside ``package`` (its ``__path__``), in name order."""
    for module in sorted(m.name for m in pkgutil.iter_modules(path)):
        importlib.import_module(f"{package}.{module}")

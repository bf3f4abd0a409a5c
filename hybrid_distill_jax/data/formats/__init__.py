"""Input formats, one module each: importing this package imports every module in it, and each format
registers itself in ``FORMATS`` (``base.register``). A new format is one new file here."""

from hybrid_distill_jax.data.formats.base import FORMATS, Format, format_of, register
from hybrid_distill_jax.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["FORMATS", "Format", "format_of", "register"]

"""Input formats, one module each: importing this package registers all of them in ``FORMATS``."""

from hybrid_distill_jax.data.formats import embedded, folder, prepared, tfds  # noqa: F401  (registration)
from hybrid_distill_jax.data.formats.base import FORMATS, Format, format_of, register

__all__ = ["FORMATS", "Format", "format_of", "register"]

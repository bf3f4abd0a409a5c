"""The packaged-dataset format (``embedded_fashion_mnist``): prepared in ``data_dir`` from the file shipped
with the library on first use (``data.embedded``), then read like any prepared TFDS dataset."""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from hybrid_distill_jax.data import embedded
from hybrid_distill_jax.data.common import EMBEDDED, INFO_FILE, base_name, expanded_data_dir, field
from hybrid_distill_jax.data.formats.base import register
from hybrid_distill_jax.data.formats.tfds import TfdsFormat, opened
from hybrid_distill_jax.errors import DataError


@register
class Embedded(TfdsFormat):
    """``config.data.name='embedded_fashion_mnist'`` (a version or config after it is ignored)."""

    name = EMBEDDED

    def handles(self, data_cfg: Any) -> bool:
        return base_name(field(data_cfg, "name")) == EMBEDDED

    def builder(self, data_cfg: Any) -> tfds.core.DatasetBuilder:
        """Prepared in ``data_dir`` unless it is there; a damaged one is a DataError."""
        data_dir = expanded_data_dir(data_cfg)
        version_dir = os.path.join(
            data_dir or embedded.default_data_dir(), EMBEDDED, str(embedded.EmbeddedFashionMnist.VERSION)
        )
        info_file = os.path.join(version_dir, INFO_FILE)
        builder = opened(lambda: embedded.ensure_prepared(data_dir), info_file)
        if not (builder.data_path / INFO_FILE).exists():  # TFDS reuses a folder without one, with no splits
            raise DataError(
                f"{info_file}: missing, so {version_dir} is an incompletely prepared dataset; remove that "
                "directory to prepare it again"
            )
        return builder

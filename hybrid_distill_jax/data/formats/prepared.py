"""The prepared-directory format: a TFDS dataset prepared on disk whose builder code is not registered,
read from its directory (``dataset_info.json`` and the record shards) by ``tfds.builder_from_directory``."""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from hybrid_distill_jax.data.common import field, prepared_dir
from hybrid_distill_jax.data.formats.base import register
from hybrid_distill_jax.data.formats.tfds import TfdsFormat, is_registered, open_directory
from hybrid_distill_jax.errors import ConfigError


@register
class Prepared(TfdsFormat):
    """``config.data.name``: a prepared dataset's directory, or ``NAME[:VERSION]`` prepared in ``data_dir``
    (a registered builder's name is the ``tfds`` format's, which falls back to this directory)."""

    name = "prepared"

    def handles(self, data_cfg: Any) -> bool:
        return not is_registered(field(data_cfg, "name")) and prepared_dir(data_cfg) is not None

    def validate(self, data_cfg: Any) -> None:
        """A prepared dataset is there (what ``handles`` checked, unless ``config.data.format`` chose it)."""
        if prepared_dir(data_cfg) is None:
            name = field(data_cfg, "name")
            raise ConfigError(
                f"config.data.name: no prepared dataset {name!r} (config.data.format='prepared'): neither "
                f"a directory holding dataset_info.json nor {name}/<version>/dataset_info.json in data_dir"
            )

    def builder(self, data_cfg: Any) -> tfds.core.DatasetBuilder:
        return open_directory(prepared_dir(data_cfg))

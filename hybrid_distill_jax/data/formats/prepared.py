"""The prepared-directory format: a TFDS dataset prepared on disk whose builder code is not registered,
read from its directory (``dataset_info.json`` and the record shards) by ``tfds.builder_from_directory``."""

from __future__ import annotations

import os
import re
from typing import Any

import tensorflow_datasets as tfds

from hybrid_distill_jax.data.common import FOLDER, INFO_FILE, expanded_data_dir, field
from hybrid_distill_jax.data.formats.base import register
from hybrid_distill_jax.data.formats.tfds import TfdsFormat, is_registered, opened


def prepared_dir(data_cfg: Any) -> str | None:
    """The directory of a TFDS dataset prepared on disk whose builder code is not registered, if any.

    ``name`` may be that directory itself (holding ``dataset_info.json``), or ``NAME[:VERSION]`` with
    ``data_dir/NAME/VERSION/dataset_info.json`` (the newest version when none is given).
    """
    name = field(data_cfg, "name")
    expanded = os.path.expanduser(name)
    if os.path.isfile(os.path.join(expanded, INFO_FILE)):
        return expanded
    data_dir = (
        expanded_data_dir(data_cfg)
        or os.environ.get("TFDS_DATA_DIR")
        or os.path.expanduser("~/tensorflow_datasets")
    )
    base, _, version = name.partition(":")
    root = os.path.join(data_dir, *base.split("/"))
    if version:
        candidates = [version]
    elif os.path.isdir(root):
        candidates = sorted(
            (v for v in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", v)),
            key=lambda v: tuple(int(x) for x in v.split(".")),
            reverse=True,
        )
    else:
        candidates = []
    for v in candidates:
        if os.path.isfile(os.path.join(root, v, INFO_FILE)):
            return os.path.join(root, v)
    return None


def open_directory(directory: str) -> tfds.core.DatasetBuilder:
    """The builder of the dataset prepared in ``directory``; damaged metadata is a DataError naming it."""
    return opened(lambda: tfds.builder_from_directory(directory), os.path.join(directory, INFO_FILE))


@register
class Prepared(TfdsFormat):
    """``config.data.name``: a prepared dataset's directory, or ``NAME[:VERSION]`` prepared in ``data_dir``
    (a registered builder's name is the ``tfds`` format's, which falls back to this directory)."""

    name = "prepared"

    def handles(self, data_cfg: Any) -> bool:
        name = field(data_cfg, "name")  # the other formats' names stay theirs, whatever is on disk
        return name != FOLDER and not is_registered(name) and prepared_dir(data_cfg) is not None

    def builder(self, data_cfg: Any) -> tfds.core.DatasetBuilder:
        return open_directory(prepared_dir(data_cfg))

"""Where the examples come from: the format that reads ``config.data`` (``formats.FORMATS``, chosen by
``config.data.format`` or detected from ``config.data.name``: a registered TFDS dataset, one prepared on
disk without its code, the packaged ``embedded_fashion_mnist`` or a local image folder), behind one factory
(``train_source``).

A source is one process's share of a split as *encoded* examples (file paths or image bytes), either held in
memory (random access: every epoch is a full permutation, skipping is free), streamed as contiguous
pieces of a large TFDS split (see ``pipeline``) or, for evaluation, a TFDS split read once in stored order.
Nothing here decodes an image.
"""

from __future__ import annotations

from typing import Any

from hybrid_distill_jax.data.common import (
    DatasetInfo,
    Source,
    check_location,
    check_reading,
    field,
    is_int,
    pair,
    read_error,
)
from hybrid_distill_jax.data.formats import format_of
from hybrid_distill_jax.data.formats.folder import list_folder

# Also here for the pipelines and tests: the shared records and helpers, the folder listing.
__all__ = ["DatasetInfo", "Source", "dataset_info", "eval_source", "field", "is_int", "list_folder", "pair"]
__all__ += ["read_error", "train_source", "validate_data_config"]


def validate_data_config(data_cfg: Any) -> None:
    """Checks ``config.data`` without reading any data or touching the network; raises ``ConfigError``.

    Called once per run, by ``config_lib.validate``; the functions below and the pipelines take a
    validated ``config.data``."""
    check_location(data_cfg)
    format_of(data_cfg).validate(data_cfg)
    check_reading(data_cfg)


def dataset_info(data_cfg: Any) -> DatasetInfo:
    """Number of classes and examples per split.

    Never downloads: a TFDS dataset that is not prepared in ``config.data.data_dir`` is a ``DataError``.
    """
    return format_of(data_cfg).info(data_cfg)


def train_source(
    data_cfg: Any, local_batch: int, global_batch: int, process_index: int, process_count: int
) -> Source:
    """This process's share of the train split, in memory or streamed."""
    return format_of(data_cfg).train_source(data_cfg, local_batch, global_batch, process_index, process_count)


def eval_source(data_cfg: Any, split: str) -> Source:
    """A folder split in memory (``items``), or a TFDS split read once in stored order (``records``)."""
    return format_of(data_cfg).eval_source(data_cfg, split)

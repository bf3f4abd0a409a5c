"""The Format interface every input format implements, and the registry that maps ``config.data`` to one.

A format knows whether it reads a ``config.data`` (``handles``), checks the fields only it reads
(``validate``), describes the dataset (``info``) and gives one process's share of the train split and a
whole eval split as ``common.Source``s. Adding a format = a subclass in ``data/formats/`` decorated with
``@register`` and imported by ``formats/__init__.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from hybrid_distill_jax.data.common import EMBEDDED, FOLDER, DatasetInfo, Source, field
from hybrid_distill_jax.errors import ConfigError

# Formats by name. At most one handles a given config: each ``handles`` leaves the others' names to them.
FORMATS: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: adds (an instance of) ``cls`` to ``FORMATS`` as ``cls.name``."""
    FORMATS[cls.name] = cls()
    return cls


def format_of(data_cfg: Any) -> Format:
    """The format that reads ``data_cfg``; none, a ``ConfigError``. Reads no data (``handles`` only looks)."""
    for fmt in FORMATS.values():
        if fmt.handles(data_cfg):
            return fmt
    name = field(data_cfg, "name")
    raise ConfigError(
        f"config.data.name: unknown dataset {name!r}: not a registered TFDS builder nor a dataset "
        f"prepared in data_dir (no {name}/<version>/dataset_info.json there); use a TFDS name "
        f"(e.g. 'cifar10', 'imagenet2012'), a prepared dataset's directory, "
        f"'{EMBEDDED}' or '{FOLDER}'"
    )


class Format:
    """Base class: ``handles``, ``info`` and the two sources are required, ``validate`` checks nothing."""

    name: ClassVar[str]

    def handles(self, data_cfg: Any) -> bool:
        """Whether this format reads ``data_cfg`` (its ``name``, ``data_dir``); reads no data, no network."""
        raise NotImplementedError

    def validate(self, data_cfg: Any) -> None:
        """Checks the fields only this format reads, without reading data; raises ``ConfigError``."""

    def info(self, data_cfg: Any) -> DatasetInfo:
        """Number of classes and examples per split; never downloads."""
        raise NotImplementedError

    def train_source(
        self, data_cfg: Any, local_batch: int, global_batch: int, process_index: int, process_count: int
    ) -> Source:
        """This process's share of ``config.data.train_split``: at least ``local_batch`` examples."""
        raise NotImplementedError

    def eval_source(self, data_cfg: Any, split: str) -> Source:
        """All of ``split``, for one deterministic pass (``items`` in memory, or ``records``)."""
        raise NotImplementedError

"""The Format interface every input format implements, and the registry that maps ``config.data`` to one.

A format is chosen by ``config.data.format``: its registered ``name`` picks it, and the default ``''``
detects it from ``config.data.name`` (``handles``). It checks the fields only it reads (``validate``),
describes the dataset (``info``) and gives one process's share of the train split and a whole eval split
as ``common.Source``s.

Adding a format is one file in ``data/formats/``: a ``Format`` subclass decorated with ``@register``
(import ``Format`` and ``register`` from this module). Every module of the folder is imported when the
package is (``registry.import_submodules``), so nothing else is edited; a format that does not override
``handles`` is only chosen by ``config.data.format=<its name>``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from hybrid_distill_jax.data.common import EMBEDDED, FOLDER, DatasetInfo, Source, base_name, field
from hybrid_distill_jax.errors import ConfigError

# Formats by name, in registration order.
FORMATS: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: adds (an instance of) ``cls`` to ``FORMATS`` as ``cls.name``."""
    FORMATS[cls.name] = cls()
    return cls


def format_of(data_cfg: Any) -> Format:
    """The format that reads ``data_cfg``: the one ``config.data.format`` names, else the first whose
    ``handles`` accepts it, offered first to the format named like the dataset (``data.name='folder'``), so
    that no format has to step aside for another's name. None, a ``ConfigError``. Reads no data."""
    chosen = field(data_cfg, "format")
    if chosen:
        if not isinstance(chosen, str) or chosen not in FORMATS:
            raise ConfigError(
                f"config.data.format: unknown format {chosen!r}; expected '' (detected from "
                f"config.data.name) or one of {sorted(FORMATS)}"
            )
        return FORMATS[chosen]
    name = field(data_cfg, "name")
    own = FORMATS.get(base_name(name))
    for fmt in ([own] if own else []) + [f for f in FORMATS.values() if f is not own]:
        if fmt.handles(data_cfg):
            return fmt
    raise ConfigError(
        f"config.data.name: unknown dataset {name!r}: not a registered TFDS builder nor a dataset "
        f"prepared in data_dir (no {name}/<version>/dataset_info.json there); use a TFDS name "
        f"(e.g. 'cifar10', 'imagenet2012'), a prepared dataset's directory, "
        f"'{EMBEDDED}' or '{FOLDER}'"
    )


class Format:
    """Base class: ``name``, ``info`` and the two sources are required; ``validate`` checks nothing and
    ``handles`` accepts nothing (the format is then only chosen by name)."""

    name: ClassVar[str]

    def handles(self, data_cfg: Any) -> bool:
        """Whether ``config.data.format=''`` detects this format from ``data_cfg`` (its ``name``,
        ``data_dir``); reads no data, no network."""
        return False

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

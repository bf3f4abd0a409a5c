"""What the input formats and the pipelines share: the ``Source`` and ``DatasetInfo`` records, reading and
checking ``config.data`` fields, and the ``DataError`` for a TFDS split's unreadable record shards.

Importing it keeps TensorFlow, which only feeds data here, off the GPUs and quiet.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hybrid_distill_jax.data import embedded
from hybrid_distill_jax.data.defaults import DATA_DEFAULTS
from hybrid_distill_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _hide_accelerators_from_tensorflow() -> None:
    """TensorFlow only feeds data here; it must never allocate GPU memory that JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TF devices already initialised; nothing more can be done.
        log.debug("could not hide GPUs from TensorFlow (already initialised)")


_hide_accelerators_from_tensorflow()
# The pipeline's functions are plain tensor code: AutoGraph has nothing to convert, and its
# "could not transform <lambda>" warnings would bury the progress lines.
tf.autograph.set_verbosity(0)
tf.get_logger().setLevel(logging.ERROR)

FOLDER = "folder"
EMBEDDED = embedded.NAME
ON_CORRUPT = ("skip", "fail")
RESIZE_METHODS = ("bilinear", "bicubic")
INFO_FILE = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the code needs to know about a dataset."""

    name: str
    num_classes: int
    num_examples: dict[str, int]
    class_names: tuple[str, ...] = ()


@dataclasses.dataclass
class Source:
    """One process's share of a split: either held in memory (``items``) or streamed (``chunks``).

    Example ids (``index`` of a train batch): in memory, item ``i`` is example ``id_start + i * id_stride``
    of the split (folders: its position in the sorted file list); streamed, the records of chunk ``c`` are
    consecutive examples of the split, each paired with its id.
    """

    description: str
    num_examples: int
    from_files: bool  # items are file paths (read them), else encoded images
    items: tf.Tensor | None = None  # tf.string [N]
    labels: tf.Tensor | None = None  # tf.int64 [N]
    id_start: int = 0
    id_stride: int = 1
    chunks: list[tf.data.Dataset] | None = None  # streamed: (id, record) pairs in a fixed order
    chunk_sizes: list[int] | None = None
    parse_record: Callable | None = None  # streamed: record -> (encoded image, int64 label)
    records: tf.data.Dataset | None = None  # evaluation: (encoded, label) pairs of a TFDS split, stored order
    files: tuple[str, ...] = ()  # the TFDS shards the examples are read from, named when reading fails
    fallible: bool = False  # reading may fail (files on disk): guard it
    on_corrupt: str = "skip"  # what an unreadable image does: 'skip' (replaced, counted) or 'fail'

    def item_name(self, position: int) -> str:
        """A readable name of item ``position`` (its path, or its example id)."""
        item = self.items[position].numpy() if self.from_files else None
        if item is not None:
            return item.decode("utf-8", "backslashreplace")  # a name that is not UTF-8 shows its bytes
        return f"example {self.id_start + position * self.id_stride} of {self.description}"


# --------------------------------------------------------------------------------------------- config


def field(data_cfg: Any, name: str) -> Any:
    """``config.data.<name>``, or its default from ``data.defaults.DATA_DEFAULTS``."""
    if isinstance(data_cfg, Mapping):
        if name in data_cfg:
            return data_cfg[name]
    else:
        try:
            return getattr(data_cfg, name)
        except AttributeError:
            pass
    if name in DATA_DEFAULTS:
        return DATA_DEFAULTS[name]
    raise ConfigError(f"config.data.{name}: missing (required)")


def base_name(name: str) -> str:
    """'cifar10:3.0.2' / 'imagenet2012/subset' -> the registered builder name."""
    return name.split(":")[0].split("/")[0]


def pair(data_cfg: Any, name: str) -> tuple[float, float]:
    value = field(data_cfg, name)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config.data.{name}: expected a (min, max) pair of numbers, got {value!r}"
        ) from None
    return lo, hi


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def expanded_data_dir(data_cfg: Any) -> str | None:
    """``config.data.data_dir`` with ``~`` expanded, or None."""
    value = field(data_cfg, "data_dir")
    return None if value is None else os.path.expanduser(str(value))


def prepared_dir(data_cfg: Any) -> str | None:
    """The directory of a TFDS dataset prepared on disk, if any: ``config.data.name`` may be that directory
    itself (holding ``dataset_info.json``), or ``NAME[:VERSION]`` with ``data_dir/NAME/VERSION/
    dataset_info.json`` (the newest version when none is given). Looks at the file system only."""
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


def split_field(data_cfg: Any, split: str) -> str:
    """The config field a split came from, for error messages."""
    return "config.data.train_split" if split == field(data_cfg, "train_split") else "config.data.eval_split"


def check_location(data_cfg: Any) -> None:
    """Checks ``config.data.name`` and ``data_dir``, what the format is chosen by; raises ``ConfigError``."""
    name = field(data_cfg, "name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"config.data.name: expected a dataset name, got {name!r}")
    value = field(data_cfg, "data_dir")
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"config.data.data_dir: expected a path or None, got {value!r}")


def check_reading(data_cfg: Any) -> None:
    """Checks the fields that every format's pipeline reads (splits, augmentation, limits); raises
    ``ConfigError``."""
    for name_ in ("train_split", "eval_split"):
        split = field(data_cfg, name_)
        if not isinstance(split, str) or not split.strip():
            raise ConfigError(f"config.data.{name_}: expected a split name, got {split!r}")
    lo, hi = pair(data_cfg, "crop_scale")
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"config.data.crop_scale: must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    lo, hi = pair(data_cfg, "crop_ratio")
    if not 0.0 < lo <= hi < np.inf:
        raise ConfigError(f"config.data.crop_ratio: must satisfy 0 < min <= max < inf, got ({lo}, {hi})")
    for name_ in ("flip", "antialias"):
        value = field(data_cfg, name_)
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"config.data.{name_}: expected a bool, got {value!r}")
    method = field(data_cfg, "resize_method")
    if method not in RESIZE_METHODS:
        raise ConfigError(
            f"config.data.resize_method: expected one of {list(RESIZE_METHODS)}, got {method!r}"
        )
    for name_, low in (("shuffle_buffer", 1), ("prefetch", 0), ("max_consecutive_unreadable", 1)):
        value = field(data_cfg, name_)
        if not is_int(value) or value < low:
            raise ConfigError(f"config.data.{name_}: expected an int >= {low}, got {value!r}")
    fraction = field(data_cfg, "max_unreadable_fraction")
    if not _is_number(fraction) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"config.data.max_unreadable_fraction: expected a number in [0, 1], got {fraction!r}"
        )
    stall = field(data_cfg, "stall_timeout_s")
    if not _is_number(stall) or not 0 < stall < np.inf:
        raise ConfigError(
            f"config.data.stall_timeout_s: expected a number of seconds in (0, inf), got {stall!r}"
        )
    on_corrupt = field(data_cfg, "on_corrupt")
    if on_corrupt not in ON_CORRUPT:
        raise ConfigError(f"config.data.on_corrupt: expected one of {list(ON_CORRUPT)}, got {on_corrupt!r}")


def too_small(description: str, n_local: int, local_batch: int, global_batch: int, process_count: int) -> str:
    """The message of a train split with fewer examples per process than one per-process batch."""
    return (
        f"{description} has {n_local} examples per process ({process_count} process(es)), fewer than one "
        f"per-process batch of {local_batch} (global batch {global_batch}); use a smaller global batch "
        "or a larger dataset"
    )


# ------------------------------------------------------------------------------------------- errors


def reason(e: BaseException) -> str:
    """'Type: first line' of a TensorFlow/TFDS error, without TensorFlow's function, op and dataset-function
    decorations; an OSError that TFDS wraps (its DatasetInfoFileError) by its own type and reason."""
    if isinstance(e, OSError) and isinstance(e.__cause__, OSError):
        e = e.__cause__
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    message = e.message if isinstance(e, tf.errors.OpError) else str(e)
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:[^\]]*\].*", "", message, flags=re.S)
    message = re.sub(
        r"^Error in user-defined function passed to \S+ transformation with iterator: \S+: ", "", message
    )
    message = re.sub(r'^Failed to construct dataset "[^"]*", builder_kwargs "[^"]*": ', "", message)
    return f"{type(e).__name__}: {(message.strip().splitlines() or [''])[0][:300]}"


def advice(e: BaseException, what: str) -> str:
    """What to do about ``e``: nothing to add for a permission error, else prepare the dataset again."""
    if isinstance(e, (PermissionError, tf.errors.PermissionDeniedError)) or isinstance(
        e.__cause__, PermissionError
    ):
        return ""
    return f"; the prepared dataset is damaged or incomplete: {what}"


def read_error(e: tf.errors.OpError, description: str, files: Sequence[str]) -> DataError:
    """``e``, raised reading or decoding the records of ``files``, as a DataError naming the file(s) TF's
    message names, else all of them (a corrupt or missing record names none)."""
    named = [f for f in files if f in e.message] or list(files)
    why = reason(e)
    for f in named:  # 'PATH; No such file or directory': the path is named once, below
        why = why.replace(f"{f}; ", "")
    if len(named) > 3:
        first = named[0]
        shown = f"the {len(named)} shard files in {os.path.dirname(first)} ({os.path.basename(first)}, ...)"
    else:
        shown = ", ".join(named)
    return DataError(f"{description}: cannot read {shown} ({why})" + advice(e, "prepare it again"))

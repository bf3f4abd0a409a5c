"""Where the examples come from: a TFDS dataset (registered, or prepared on disk without its code), the
packaged ``embedded_fashion_mnist`` or a local image folder, behind one factory (``train_source``).

A source is one process's share of a split as *encoded* examples (file paths or image bytes), either held in
memory (random access: every epoch is a full permutation, skipping is free), streamed as contiguous
pieces of a large TFDS split (see ``pipeline``) or, for evaluation, a TFDS split read once in stored order.
Nothing here decodes an image.

A prepared TFDS dataset's damaged files are a ``DataError`` naming them: its metadata (``dataset_info.json``)
when the builder is opened, its record shards when they are read (``read_error``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf import json_format

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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# A TFDS split whose per-process share is at most this many bytes is held in memory (encoded).
IN_MEMORY_MAX_BYTES = 1 << 30
# A streamed split is read as this many pieces per process, merged in a new random order every epoch.
STREAM_CHUNKS = 16
ON_CORRUPT = ("skip", "fail")
RESIZE_METHODS = ("bilinear", "bicubic")
INFO_FILE = "dataset_info.json"
# What TFDS raises opening a prepared dataset whose metadata is damaged: unreadable or a directory (OSError,
# tf.errors.OpError), not UTF-8 or not JSON (ValueError, json_format.ParseError), incomplete (KeyError).
_METADATA_ERRORS = (OSError, ValueError, KeyError, json_format.ParseError, tf.errors.OpError)


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


def _base_name(name: str) -> str:
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


def _prepared_dir(data_cfg: Any) -> str | None:
    """The directory of a TFDS dataset prepared on disk whose builder code is not registered, if any.

    ``name`` may be that directory itself (holding ``dataset_info.json``), or ``NAME[:VERSION]`` with
    ``data_dir/NAME/VERSION/dataset_info.json`` (the newest version when none is given).
    """
    name = field(data_cfg, "name")
    expanded = os.path.expanduser(name)
    if os.path.isfile(os.path.join(expanded, INFO_FILE)):
        return expanded
    data_dir = (
        _data_dir(data_cfg) or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
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


def validate_data_config(data_cfg: Any) -> None:
    """Checks ``config.data`` without reading any data or touching the network; raises ``ConfigError``."""
    name = field(data_cfg, "name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"config.data.name: expected a dataset name, got {name!r}")
    data_dir = field(data_cfg, "data_dir")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ConfigError(f"config.data.data_dir: expected a path or None, got {data_dir!r}")
    if name == FOLDER:
        if data_dir is None or not str(data_dir).strip():
            raise ConfigError(
                "config.data.data_dir: required when config.data.name='folder' "
                "(the root holding <split>/<class>/*.jpg|jpeg|png)"
            )
        if not os.path.isdir(os.path.expanduser(str(data_dir))):
            raise ConfigError(
                f"config.data.data_dir: folder dataset root {str(data_dir)!r} is not a directory"
            )
    elif (
        _base_name(name) != EMBEDDED
        and _base_name(name) not in tfds.list_builders(with_community_datasets=False)
        and _prepared_dir(data_cfg) is None
    ):
        raise ConfigError(
            f"config.data.name: unknown dataset {name!r}: not a registered TFDS builder nor a dataset "
            f"prepared in data_dir (no {name}/<version>/dataset_info.json there); use a TFDS name "
            f"(e.g. 'cifar10', 'imagenet2012'), a prepared dataset's directory, "
            f"'{EMBEDDED}' or '{FOLDER}'"
        )
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


def _data_dir(data_cfg: Any) -> str | None:
    data_dir = field(data_cfg, "data_dir")
    return None if data_dir is None else os.path.expanduser(str(data_dir))


def split_field(data_cfg: Any, split: str) -> str:
    """The config field a split came from, for error messages."""
    return "config.data.train_split" if split == field(data_cfg, "train_split") else "config.data.eval_split"


# ----------------------------------------------------------------------------------------------- TFDS


def _not_prepared_message(builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None) -> str:
    root = data_dir or embedded.default_data_dir()
    msg = (
        f"dataset '{name}' is not prepared in data_dir '{root}' (expected {builder.data_dir}); "
        "nothing is downloaded automatically. "
    )
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
        manual_dir = os.path.join(root, "downloads", "manual")
        how = " ".join(str(instructions).split())[:300]
        base = _base_name(name)
        msg += (
            f"'{name}' needs a manual download: {how} Put those files in {manual_dir} and run "
            f"`tfds build {base} --data_dir {root} --manual_dir {manual_dir}`."
        )
    else:
        msg += (
            f"Prepare it with `tfds build {_base_name(name)} --data_dir {root}` on a machine with internet "
            f"access, or copy a prepared '{_base_name(name)}' folder into {root}."
        )
    return msg


def _reason(e: BaseException) -> str:
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


def _advice(e: BaseException, what: str) -> str:
    """What to do about ``e``: nothing to add for a permission error, else prepare the dataset again."""
    if isinstance(e, (PermissionError, tf.errors.PermissionDeniedError)) or isinstance(
        e.__cause__, PermissionError
    ):
        return ""
    return f"; the prepared dataset is damaged or incomplete: {what}"


def _metadata_error(info_file: str, e: BaseException) -> DataError:
    return DataError(
        f"{info_file}: cannot be read as a prepared TFDS dataset's metadata ({_reason(e)})"
        + _advice(e, f"remove {os.path.dirname(info_file)} and prepare it again")
    )


def _opened(make: Callable[[], tfds.core.DatasetBuilder], info_file: str) -> tfds.core.DatasetBuilder:
    """``make()``, which reads the prepared dataset's metadata ``info_file``; damaged, a DataError."""
    try:
        builder = make()
        builder.info.features  # noqa: B018 - read here, so that damaged metadata fails here
    except _METADATA_ERRORS as e:
        raise _metadata_error(info_file, e) from e
    return builder


def _registered_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """``tfds.builder``; when the metadata it finds prepared in ``data_dir`` is damaged, a DataError naming
    that file (a wrong version or config name fails as before, building the same builder without data)."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except _METADATA_ERRORS as e:
        with tempfile.TemporaryDirectory() as nowhere:
            try:
                variant = os.path.relpath(tfds.builder(name, data_dir=nowhere).data_dir, nowhere)
            except Exception:  # noqa: BLE001 - the name itself is wrong: its own error, as before
                raise e from None
        info_file = os.path.join(data_dir or embedded.default_data_dir(), variant, INFO_FILE)
        raise _metadata_error(info_file, e) from e


def _embedded_builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The embedded dataset, prepared in ``data_dir`` unless it is there; a damaged one is a DataError."""
    version_dir = os.path.join(
        data_dir or embedded.default_data_dir(), EMBEDDED, str(embedded.EmbeddedFashionMnist.VERSION)
    )
    info_file = os.path.join(version_dir, INFO_FILE)
    builder = _opened(lambda: embedded.ensure_prepared(data_dir), info_file)
    if not (builder.data_path / INFO_FILE).exists():  # TFDS reuses a folder without one, with no splits
        raise DataError(
            f"{info_file}: missing, so {version_dir} is an incompletely prepared dataset; remove that "
            "directory to prepare it again"
        )
    return builder


def tfds_builder(data_cfg: Any) -> tfds.core.DatasetBuilder:
    """A prepared builder; never downloads (the embedded dataset is prepared from the packaged file).

    A registered builder is used when its data is prepared; otherwise a dataset prepared on disk is read
    from its directory without its code (``tfds.builder_from_directory``).
    """
    name = field(data_cfg, "name")
    data_dir = _data_dir(data_cfg)
    if _base_name(name) == EMBEDDED:
        return _embedded_builder(data_dir)
    builder = None
    if _base_name(name) in tfds.list_builders(with_community_datasets=False):
        builder = _registered_builder(name, data_dir)
    if builder is None or not builder.is_prepared():
        directory = _prepared_dir(data_cfg)
        if directory is not None:
            builder = _opened(
                lambda: tfds.builder_from_directory(directory), os.path.join(directory, INFO_FILE)
            )
        elif builder is None:
            raise ConfigError(f"config.data.name: unknown dataset {name!r}: not a registered TFDS builder")
        else:
            raise DataError(_not_prepared_message(builder, name, data_dir))
    features = builder.info.features
    for key in ("image", "label"):
        if key not in features:
            raise DataError(
                f"dataset '{name}' has no '{key}' feature (features: {sorted(features.keys())}); "
                "only image classification datasets with 'image' and 'label' are supported"
            )
    return builder


def _split_base(split: str) -> str:
    return re.split(r"[\[+]", split)[0].strip()


def check_tfds_split(builder: tfds.core.DatasetBuilder, data_cfg: Any, split: str) -> int:
    """Number of examples of ``split`` (which may carry a slice, e.g. 'train[:90%]')."""
    if _split_base(split) not in builder.info.splits:
        raise ConfigError(
            f"{split_field(data_cfg, split)}: split {split!r} not in dataset '{builder.name}' "
            f"(available: {sorted(builder.info.splits.keys())})"
        )
    try:
        return int(builder.info.splits[split].num_examples)
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(f"{split_field(data_cfg, split)}: invalid split {split!r}: {e}") from e


def _first_example(builder: tfds.core.DatasetBuilder, split: str, piece: Any) -> int:
    """Index, in the whole split, of the first example of ``piece`` (a contiguous part of it)."""
    whole = builder.info.splits[_split_base(split)]
    instructions = builder.info.splits[piece].file_instructions
    if not instructions:
        return 0
    names = [os.path.basename(str(f)) for f in whole.filenames]
    shard = names.index(os.path.basename(str(instructions[0].filename)))
    return int(sum(whole.shard_lengths[:shard]) + instructions[0].skip)


def _read_config() -> tfds.ReadConfig:
    """Records in stored order: one shard file at a time (TFDS otherwise interleaves 16 of them)."""
    options = tf.data.Options()
    options.deterministic = True
    return tfds.ReadConfig(
        options=options, try_autocache=False, skip_prefetch=True, interleave_cycle_length=1
    )


def shard_files(builder: tfds.core.DatasetBuilder, splits: Sequence[Any]) -> tuple[str, ...]:
    """The TFDS shard files that hold the records of ``splits``, in reading order."""
    files = (str(f.filename) for s in splits for f in builder.info.splits[s].file_instructions)
    return tuple(dict.fromkeys(files))


def read_error(e: tf.errors.OpError, description: str, files: Sequence[str]) -> DataError:
    """``e``, raised reading or decoding the records of ``files``, as a DataError naming the file(s) TF's
    message names, else all of them (a corrupt or missing record names none)."""
    named = [f for f in files if f in e.message] or list(files)
    reason = _reason(e)
    for f in named:  # 'PATH; No such file or directory': the path is named once, below
        reason = reason.replace(f"{f}; ", "")
    if len(named) > 3:
        first = named[0]
        shown = f"the {len(named)} shard files in {os.path.dirname(first)} ({os.path.basename(first)}, ...)"
    else:
        shown = ", ".join(named)
    return DataError(f"{description}: cannot read {shown} ({reason})" + _advice(e, "prepare it again"))


def tfds_encoded(builder: tfds.core.DatasetBuilder, split: Any) -> tf.data.Dataset:
    """(encoded image bytes, int64 label) pairs of ``split`` in stored order; ArrayRecord shards through
    ``tfds_records`` (TFDS's ``as_dataset`` cannot read them)."""
    if _stores_array_records(builder):
        return tfds_records(builder, split).map(
            _parse_image_and_label, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=_read_config(),
    )
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64)))


def _parse_image_and_label(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(encoded image bytes, int64 label) of one serialized TFDS example (what ``tfds_encoded`` yields)."""
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    example = tf.io.parse_single_example(serialized, spec)
    return example["image"], example["label"]


def _stores_array_records(builder: tfds.core.DatasetBuilder) -> bool:
    return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def _tfrecord_shard(path: str, skip: int, take: int) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(path).skip(skip).take(take)


# ArrayRecord records are read this many at a time: one Python call per record costs more than the read.
_ARRAY_RECORD_BLOCK = 64
# A reader is opened for each block (nothing to share between calls or to close at the end of a shard), so
# it reads no further than the block.
_ARRAY_RECORD_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def _array_record_block(reader_class: type, path: str, start: int, end: int) -> tuple[np.ndarray, bytes]:
    """(records ``start:end`` of the ArrayRecord shard ``path``, b''), or (no records, b'PATH; why') when
    it cannot be read. The error travels as data: an exception raised here would print its Python
    traceback through TensorFlow."""
    reader = reader_class(path, _ARRAY_RECORD_OPTIONS)
    try:
        if not reader.ok():
            reader.close()  # raises why the file could not be opened (missing, not an ArrayRecord file, ...)
        records = reader.read(int(start), int(end))
        reader.close()
    except (RuntimeError, IndexError) as e:  # also: a damaged chunk, fewer records than the metadata says
        return np.array([], object), f"{path}; {str(e) or 'cannot be opened as an ArrayRecord file'}".encode()
    return np.array(records, object), b""


def _array_record_shard(path: str, skip: int, take: int) -> tf.data.Dataset:
    """Records ``skip`` to ``skip + take`` of an ArrayRecord shard in stored order, read by array_record's
    reader a block per ``tf.numpy_function`` call. (``Dataset.from_generator`` would read them as well, but
    it lowers the process's malloc trim threshold, which slows the whole input pipeline.)"""
    from array_record.python.array_record_module import ArrayRecordReader  # installed with TFDS (Linux)

    read = functools.partial(_array_record_block, ArrayRecordReader, path)
    stop = skip + take

    def block(start: tf.Tensor) -> tf.Tensor:
        end = tf.minimum(start + _ARRAY_RECORD_BLOCK, stop)
        records, error = tf.numpy_function(read, [start, end], [tf.string, tf.string])
        records.set_shape([None])
        with tf.control_dependencies([tf.debugging.Assert(tf.equal(error, ""), [error])]):
            return tf.identity(records)  # a failure is an op error whose message is the one line above

    return tf.data.Dataset.range(skip, stop, _ARRAY_RECORD_BLOCK).map(block).unbatch()


# The file formats whose shards are read directly; others are read through TFDS.
_SHARD_READERS = {
    tfds.core.FileFormat.TFRECORD: _tfrecord_shard,
    tfds.core.FileFormat.ARRAY_RECORD: _array_record_shard,
}


def tfds_records(builder: tfds.core.DatasetBuilder, split: Any) -> tf.data.Dataset:
    """The records of ``split`` in stored order; ``record_parser(builder)`` turns one into (encoded image
    bytes, int64 label).

    TFRecord and ArrayRecord shards are read directly, one after another, and left serialized: parsing then
    runs in the caller's parallel map instead of ahead of its shuffle buffer, which otherwise waits for a
    whole buffer of parsed records at every epoch start. Other file formats are read through TFDS, already
    parsed.
    """
    read = _SHARD_READERS.get(builder.info.file_format)
    if read is None:
        return tfds_encoded(builder, split)
    parts = [read(str(f.filename), f.skip, f.take) for f in builder.info.splits[split].file_instructions]
    return functools.reduce(tf.data.Dataset.concatenate, parts)


def record_parser(builder: tfds.core.DatasetBuilder) -> Callable:
    """What turns a record of ``tfds_records(builder, ...)`` into (encoded image bytes, int64 label)."""
    return _parse_image_and_label if builder.info.file_format in _SHARD_READERS else lambda record: record


# --------------------------------------------------------------------------------------------- folder


def _folder_root(data_cfg: Any) -> str:
    return _data_dir(data_cfg) or ""


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _folder_classes(data_cfg: Any, split: str) -> list[str]:
    """Class names (sorted): the class folders of the train split, else of ``split``."""
    root = _folder_root(data_cfg)
    for s in (field(data_cfg, "train_split"), split):
        d = os.path.join(root, s)
        if os.path.isdir(d):
            classes = _subdirs(d)
            if classes:
                return classes
    raise DataError(f"folder dataset {root}: no class folders under {os.path.join(root, split)}")


def list_folder(data_cfg: Any, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(sorted file paths, int64 labels, class names) of ``root/<split>/<class>/*.{jpg,jpeg,png}``."""
    root = _folder_root(data_cfg)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(
            f"folder dataset {root}: split folder {split_dir} does not exist "
            f"({split_field(data_cfg, split)}={split!r})"
        )
    classes = _folder_classes(data_cfg, split)
    label_of = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for cname in _subdirs(split_dir):
        if cname not in label_of:
            raise DataError(
                f"folder dataset {root}: class folder {os.path.join(split_dir, cname)} is not one of the "
                f"{len(classes)} classes found in the train split"
            )
        cdir = os.path.join(split_dir, cname)
        with os.scandir(cdir) as it:
            files = sorted(
                e.name for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
        paths.extend(os.path.join(cdir, f) for f in files)
        labels.extend([label_of[cname]] * len(files))
    if not paths:
        raise DataError(f"folder dataset {root}: no .jpg/.jpeg/.png images in {split_dir}/<class>/")
    return paths, np.asarray(labels, np.int64), classes


def folder_description(data_cfg: Any, split: str) -> str:
    return f"folder dataset {os.path.join(_folder_root(data_cfg), split)}"


# ------------------------------------------------------------------------------------------ dataset info


def dataset_info(data_cfg: Any) -> DatasetInfo:
    """Number of classes and examples per split.

    Never downloads: a TFDS dataset that is not prepared in ``config.data.data_dir`` is a ``DataError``.
    """
    validate_data_config(data_cfg)
    name = field(data_cfg, "name")
    if name == FOLDER:
        root = _folder_root(data_cfg)
        splits = [s for s in _subdirs(root) if _subdirs(os.path.join(root, s))]
        wanted = [field(data_cfg, "train_split"), field(data_cfg, "eval_split")]
        if not any(s in splits for s in wanted):
            raise DataError(
                f"folder dataset {root}: neither {wanted[0]!r} nor {wanted[1]!r} exists as <split>/<class>/"
            )
        classes: list[str] = []
        counts = {}
        for split in splits:
            paths, _, classes = list_folder(data_cfg, split)
            counts[split] = len(paths)
        return DatasetInfo(
            name=name, num_classes=len(classes), num_examples=counts, class_names=tuple(classes)
        )
    builder = tfds_builder(data_cfg)
    label = builder.info.features["label"]
    counts = {str(k): int(v.num_examples) for k, v in builder.info.splits.items()}
    return DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        num_examples=counts,
        class_names=tuple(getattr(label, "names", ()) or ()),
    )


# -------------------------------------------------------------------------------------------- sources


def _load_encoded(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for enc, lab in tfds.as_numpy(ds.batch(4096)):
        images.append(enc)
        labels.append(lab)
    if not images:
        return np.zeros([0], object), np.zeros([0], np.int64)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def _too_small(
    description: str, n_local: int, local_batch: int, global_batch: int, process_count: int
) -> str:
    return (
        f"{description} has {n_local} examples per process ({process_count} process(es)), fewer than one "
        f"per-process batch of {local_batch} (global batch {global_batch}); use a smaller global batch "
        "or a larger dataset"
    )


def folder_source(data_cfg: Any, split: str, process_index: int = 0, process_count: int = 1) -> Source:
    """Every ``process_count``-th file of a folder split from ``process_index`` on (every class on every
    process, since the list is sorted by class)."""
    paths, labels, _ = list_folder(data_cfg, split)
    usable = len(paths) // process_count * process_count
    paths = paths[process_index:usable:process_count]
    return Source(
        description=folder_description(data_cfg, split),
        num_examples=len(paths),
        from_files=True,
        # As bytes: a file name need not be UTF-8 (os.scandir escapes the bytes it cannot decode).
        items=tf.constant(np.asarray([os.fsencode(p) for p in paths], dtype=object), tf.string),
        labels=tf.constant(labels[process_index:usable:process_count], tf.int64),
        id_start=process_index,
        id_stride=process_count,
        fallible=True,
        on_corrupt=field(data_cfg, "on_corrupt"),
    )


def train_source(
    data_cfg: Any, local_batch: int, global_batch: int, process_index: int, process_count: int
) -> Source:
    """This process's share of the train split, in memory or streamed."""
    name = field(data_cfg, "name")
    split = field(data_cfg, "train_split")
    if name == FOLDER:
        source = folder_source(data_cfg, split, process_index, process_count)
        if source.num_examples < local_batch:
            raise DataError(
                _too_small(source.description, source.num_examples, local_batch, global_batch, process_count)
            )
        return source

    builder = tfds_builder(data_cfg)
    total = check_tfds_split(builder, data_cfg, split)
    description = f"dataset '{name}' split '{split}'"
    if total // process_count < local_batch:
        raise DataError(
            _too_small(description, total // process_count, local_batch, global_batch, process_count)
        )
    sub = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    n_local = int(builder.info.splits[sub].num_examples)
    whole = builder.info.splits[_split_base(split)]
    num_bytes = int(whole.num_bytes or 0)
    share = num_bytes * n_local / max(1, int(whole.num_examples))  # estimated bytes held by this process
    in_memory = share <= IN_MEMORY_MAX_BYTES if num_bytes > 0 else n_local <= 200_000
    if in_memory:
        files = shard_files(builder, [sub])
        try:
            items, labels = _load_encoded(tfds_encoded(builder, sub))
        except tf.errors.OpError as e:
            raise read_error(e, description, files) from e
        if items.shape[0] != n_local:
            raise DataError(f"{description}: read {items.shape[0]} examples, dataset_info says {n_local}")
        return Source(
            description=description,
            num_examples=n_local,
            from_files=False,
            items=tf.constant(items, tf.string),
            labels=tf.constant(labels, tf.int64),
            id_start=_first_example(builder, split, sub),
            files=files,
        )
    # Streamed: this process reads its own STREAM_CHUNKS contiguous pieces of the split; every epoch merges
    # them in a random (seeded) interleaving, so any example can come at any point of an epoch.
    num_chunks = max(1, min(STREAM_CHUNKS, n_local // 1000))
    pieces = tfds.even_splits(split, n=process_count * num_chunks, drop_remainder=True)
    pieces = pieces[process_index * num_chunks : (process_index + 1) * num_chunks]
    sizes = [int(builder.info.splits[p].num_examples) for p in pieces]
    chunks = [tfds_records(builder, p).enumerate(_first_example(builder, split, p)) for p in pieces]
    log.info("%s: streaming %d examples per process (too large to hold in memory)", description, sum(sizes))
    return Source(
        description=description,
        num_examples=sum(sizes),
        from_files=False,
        chunks=chunks,
        chunk_sizes=sizes,
        parse_record=record_parser(builder),
        files=shard_files(builder, pieces),
    )


def eval_source(data_cfg: Any, split: str) -> Source:
    """A folder split in memory (``items``), or a TFDS split read once in stored order (``records``)."""
    if field(data_cfg, "name") == FOLDER:
        return folder_source(data_cfg, split)
    builder = tfds_builder(data_cfg)
    return Source(
        description=f"dataset '{field(data_cfg, 'name')}' split '{split}'",
        num_examples=check_tfds_split(builder, data_cfg, split),
        from_files=False,
        records=tfds_encoded(builder, split),
        files=shard_files(builder, [split]),
    )

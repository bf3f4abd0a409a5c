"""TFDS datasets: the format of a registered TFDS builder's name (``cifar10``, ``imagenet2012:5.1.0``), and
``TfdsFormat``, what every format read through a prepared TFDS builder shares: its splits as sources (held
in memory, or streamed from its TFRecord or ArrayRecord shards) and its metadata opened safely.

Never downloads. A prepared dataset's damaged files are a ``DataError`` naming them: its metadata
(``dataset_info.json``) when the builder is opened, its record shards when they are read
(``common.read_error``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf import json_format

from hybrid_distill_jax.data import embedded
from hybrid_distill_jax.data.common import (
    INFO_FILE,
    DatasetInfo,
    Source,
    advice,
    base_name,
    expanded_data_dir,
    field,
    prepared_dir,
    read_error,
    reason,
    split_field,
    too_small,
)
from hybrid_distill_jax.data.formats.base import Format, register
from hybrid_distill_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# A split whose per-process share is at most this many bytes is held in memory (encoded), else streamed.
# Read at each call: a benchmark or test sets it to 0 here to stream a small split.
IN_MEMORY_MAX_BYTES = 1 << 30
# A streamed split is read as this many pieces per process, merged in a new random order every epoch.
STREAM_CHUNKS = 16
# What TFDS raises opening a prepared dataset whose metadata is damaged: unreadable or a directory (OSError,
# tf.errors.OpError), not UTF-8 or not JSON (ValueError, json_format.ParseError), incomplete (KeyError).
_METADATA_ERRORS = (OSError, ValueError, KeyError, json_format.ParseError, tf.errors.OpError)


# ------------------------------------------------------------------------------------------- builders


def _metadata_error(info_file: str, e: BaseException) -> DataError:
    return DataError(
        f"{info_file}: cannot be read as a prepared TFDS dataset's metadata ({reason(e)})"
        + advice(e, f"remove {os.path.dirname(info_file)} and prepare it again")
    )


def opened(make: Callable[[], tfds.core.DatasetBuilder], info_file: str) -> tfds.core.DatasetBuilder:
    """``make()``, which reads the prepared dataset's metadata ``info_file``; damaged, a DataError."""
    try:
        builder = make()
        builder.info.features  # noqa: B018 - read here, so that damaged metadata fails here
    except _METADATA_ERRORS as e:
        raise _metadata_error(info_file, e) from e
    return builder


def open_directory(directory: str) -> tfds.core.DatasetBuilder:
    """The builder of the dataset prepared in ``directory`` (``common.prepared_dir``), without its builder
    code; damaged metadata is a DataError naming it."""
    return opened(lambda: tfds.builder_from_directory(directory), os.path.join(directory, INFO_FILE))


def is_registered(name: str) -> bool:
    """Whether the builder of dataset ``name`` is registered with TFDS (its code is installed)."""
    return base_name(name) in tfds.list_builders(with_community_datasets=False)


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
        base = base_name(name)
        msg += (
            f"'{name}' needs a manual download: {how} Put those files in {manual_dir} and run "
            f"`tfds build {base} --data_dir {root} --manual_dir {manual_dir}`."
        )
    else:
        msg += (
            f"Prepare it with `tfds build {base_name(name)} --data_dir {root}` on a machine with internet "
            f"access, or copy a prepared '{base_name(name)}' folder into {root}."
        )
    return msg


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


# --------------------------------------------------------------------------------------------- splits


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


# -------------------------------------------------------------------------------------------- records


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


def _load_encoded(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for enc, lab in tfds.as_numpy(ds.batch(4096)):
        images.append(enc)
        labels.append(lab)
    if not images:
        return np.zeros([0], object), np.zeros([0], np.int64)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


# -------------------------------------------------------------------------------------------- formats


class TfdsFormat(Format):
    """A format read through a prepared TFDS builder (``builder``): the dataset's info and sources come from
    its metadata and record shards. Only image classification datasets ('image', 'label') are read."""

    def builder(self, data_cfg: Any) -> tfds.core.DatasetBuilder:
        """The prepared builder of ``data_cfg``; never downloads."""
        raise NotImplementedError

    def open(self, data_cfg: Any) -> tfds.core.DatasetBuilder:
        """``builder``, checked to have an 'image' and a 'label' feature."""
        name = field(data_cfg, "name")
        builder = self.builder(data_cfg)
        features = builder.info.features
        for key in ("image", "label"):
            if key not in features:
                raise DataError(
                    f"dataset '{name}' has no '{key}' feature (features: {sorted(features.keys())}); "
                    "only image classification datasets with 'image' and 'label' are supported"
                )
        return builder

    def info(self, data_cfg: Any) -> DatasetInfo:
        builder = self.open(data_cfg)
        label = builder.info.features["label"]
        counts = {str(k): int(v.num_examples) for k, v in builder.info.splits.items()}
        return DatasetInfo(
            name=field(data_cfg, "name"),
            num_classes=int(label.num_classes),
            num_examples=counts,
            class_names=tuple(getattr(label, "names", ()) or ()),
        )

    def train_source(
        self, data_cfg: Any, local_batch: int, global_batch: int, process_index: int, process_count: int
    ) -> Source:
        """In memory when this process's share of the split is at most ``IN_MEMORY_MAX_BYTES``, else
        streamed."""
        name = field(data_cfg, "name")
        split = field(data_cfg, "train_split")
        builder = self.open(data_cfg)
        total = check_tfds_split(builder, data_cfg, split)
        description = f"dataset '{name}' split '{split}'"
        if total // process_count < local_batch:
            raise DataError(
                too_small(description, total // process_count, local_batch, global_batch, process_count)
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
        # Streamed: this process reads its own STREAM_CHUNKS contiguous pieces of the split; every epoch
        # merges them in a random (seeded) interleaving, so any example can come at any point of an epoch.
        num_chunks = max(1, min(STREAM_CHUNKS, n_local // 1000))
        pieces = tfds.even_splits(split, n=process_count * num_chunks, drop_remainder=True)
        pieces = pieces[process_index * num_chunks : (process_index + 1) * num_chunks]
        sizes = [int(builder.info.splits[p].num_examples) for p in pieces]
        chunks = [tfds_records(builder, p).enumerate(_first_example(builder, split, p)) for p in pieces]
        log.info(
            "%s: streaming %d examples per process (too large to hold in memory)", description, sum(sizes)
        )
        return Source(
            description=description,
            num_examples=sum(sizes),
            from_files=False,
            chunks=chunks,
            chunk_sizes=sizes,
            parse_record=record_parser(builder),
            files=shard_files(builder, pieces),
        )

    def eval_source(self, data_cfg: Any, split: str) -> Source:
        """The split read once in stored order (``records``)."""
        builder = self.open(data_cfg)
        return Source(
            description=f"dataset '{field(data_cfg, 'name')}' split '{split}'",
            num_examples=check_tfds_split(builder, data_cfg, split),
            from_files=False,
            records=tfds_encoded(builder, split),
            files=shard_files(builder, [split]),
        )


@register
class Registered(TfdsFormat):
    """A dataset whose TFDS builder is registered, read from ``data_dir`` where it is prepared there, else
    from a copy prepared elsewhere on disk (``common.prepared_dir``). The packaged dataset, registered too,
    is detected as its own format (``formats.embedded``), which prepares it."""

    name = "tfds"

    def handles(self, data_cfg: Any) -> bool:
        return is_registered(field(data_cfg, "name"))

    def builder(self, data_cfg: Any) -> tfds.core.DatasetBuilder:
        name = field(data_cfg, "name")
        data_dir = expanded_data_dir(data_cfg)
        builder = _registered_builder(name, data_dir)
        if builder.is_prepared():
            return builder
        directory = prepared_dir(data_cfg)
        if directory is None:
            raise DataError(_not_prepared_message(builder, name, data_dir))
        return open_directory(directory)

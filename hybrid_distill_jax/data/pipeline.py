"""Deterministic tf.data input pipelines for training and evaluation.

Every dataset (a TFDS dataset, the packaged ``embedded_fashion_mnist`` or a local image folder) goes through
the same steps: a per-process list of *encoded* examples -> a per-epoch order that is a pure function of
(seed, epoch, process) -> skip to ``start_step`` (before any decoding) -> decode + augment with stateless ops
seeded by (seed, global element index) -> batch. The stream therefore depends only on the dataset, the seed
and the process index/count, and a resumed iterator yields exactly what the uninterrupted one would have.

Two ways of holding a split:

* in memory (file paths of a folder dataset, or the encoded images of a TFDS split whose per-process share is
  at most ``IN_MEMORY_MAX_BYTES``): each epoch is a full random permutation, and skipping is free;
* streamed (large TFDS splits such as ImageNet): each process reads 16 contiguous pieces of the split,
  merged every epoch in a seeded random interleaving and then mixed by a shuffle buffer of
  ``config.data.shuffle_buffer`` elements seeded per epoch; resuming re-reads, without decoding, the records
  of the current epoch before ``start_step``.

Images come out as float32 in [0, 1] (no mean/std normalisation: every model normalises on device).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hybrid_distill_jax.config_lib import DATA_DEFAULTS
from hybrid_distill_jax.data import embedded
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
# A folder image that cannot be decoded is replaced by the next readable one of its shard (train) so that
# every batch keeps its size and the stream stays resumable; at most this many files are tried.
_MAX_FALLBACKS = 4
_FOREVER = 1 << 62
# A streamed split is read as this many pieces per process, merged in a new random order every epoch.
_STREAM_CHUNKS = 16
_PERM_DOMAIN = 0x5EED_0001
_AUG_DOMAIN = 0x5EED_0002
_ALG = "philox"

ON_CORRUPT = ("skip", "fail")

# Unreadable files met by the pipelines of this process, in the order met (logged by the trainer).
_UNREADABLE: list[str] = []


def unreadable_files() -> list[str]:
    """Paths of the unreadable images skipped so far in this process."""
    return list(_UNREADABLE)


def _note_unreadable(path, fail) -> np.int64:
    path = path.numpy().decode("utf-8", "replace") if hasattr(path, "numpy") else str(path)
    if bool(fail.numpy() if hasattr(fail, "numpy") else fail):
        raise DataError(f"unreadable image {path} (config.data.on_corrupt='fail'; use 'skip' to skip it)")
    if path not in _UNREADABLE:
        _UNREADABLE.append(path)
        print(f"hybrid_distill_jax.data: skipping unreadable image {path}", file=sys.stderr, flush=True)
    return np.int64(0)


def _translate_errors(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Re-raises a DataError raised inside tf.data (wrapped by TensorFlow) as itself, one line."""
    try:
        yield from batches
    except tf.errors.OpError as e:
        match = re.search(r"DataError: (.*)", e.message or "")
        if match:
            raise DataError(match.group(1).strip()) from None
        raise


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the code needs to know about a dataset."""

    name: str
    num_classes: int
    num_examples: dict[str, int]
    class_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------- config


def _field(data_cfg: Any, name: str) -> Any:
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


def _pair(data_cfg: Any, field: str) -> tuple[float, float]:
    value = _field(data_cfg, field)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config.data.{field}: expected a (min, max) pair of numbers, got {value!r}"
        ) from None
    return lo, hi


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_data_config(data_cfg: Any) -> None:
    """Checks ``config.data`` without reading any data or touching the network; raises ``ConfigError``."""
    name = _field(data_cfg, "name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"config.data.name: expected a dataset name, got {name!r}")
    data_dir = _field(data_cfg, "data_dir")
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
    elif _base_name(name) != EMBEDDED and _base_name(name) not in tfds.list_builders(
        with_community_datasets=False
    ):
        raise ConfigError(
            f"config.data.name: unknown dataset {name!r}: not a registered TFDS builder; use a TFDS name "
            f"(e.g. 'cifar10', 'imagenet2012'), '{EMBEDDED}' or '{FOLDER}'"
        )
    for field in ("train_split", "eval_split"):
        split = _field(data_cfg, field)
        if not isinstance(split, str) or not split.strip():
            raise ConfigError(f"config.data.{field}: expected a split name, got {split!r}")
    lo, hi = _pair(data_cfg, "crop_scale")
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"config.data.crop_scale: must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    lo, hi = _pair(data_cfg, "crop_ratio")
    if not 0.0 < lo <= hi:
        raise ConfigError(f"config.data.crop_ratio: must satisfy 0 < min <= max, got ({lo}, {hi})")
    flip = _field(data_cfg, "flip")
    if not isinstance(flip, (bool, np.bool_)):
        raise ConfigError(f"config.data.flip: expected a bool, got {flip!r}")
    shuffle_buffer = _field(data_cfg, "shuffle_buffer")
    if not _is_int(shuffle_buffer) or shuffle_buffer < 1:
        raise ConfigError(f"config.data.shuffle_buffer: expected an int >= 1, got {shuffle_buffer!r}")
    prefetch = _field(data_cfg, "prefetch")
    if not _is_int(prefetch) or prefetch < 0:
        raise ConfigError(f"config.data.prefetch: expected an int >= 0 (batches), got {prefetch!r}")
    on_corrupt = _field(data_cfg, "on_corrupt")
    if on_corrupt not in ON_CORRUPT:
        raise ConfigError(f"config.data.on_corrupt: expected one of {list(ON_CORRUPT)}, got {on_corrupt!r}")


def _data_dir(data_cfg: Any) -> str | None:
    data_dir = _field(data_cfg, "data_dir")
    return None if data_dir is None else os.path.expanduser(str(data_dir))


def _split_field(data_cfg: Any, split: str) -> str:
    """The config field a split came from, for error messages."""
    return "config.data.train_split" if split == _field(data_cfg, "train_split") else "config.data.eval_split"


def _check_positive_int(value: Any, what: str) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{what}: expected an int >= 1, got {value!r}")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not _is_int(process_count) or process_count < 1:
        raise ConfigError(f"process_count: expected an int >= 1, got {process_count!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index: expected an int in [0, {process_count}), got {process_index!r}")
    return int(process_index), int(process_count)


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


def _tfds_builder(data_cfg: Any) -> tfds.core.DatasetBuilder:
    """A prepared builder; never downloads (the embedded dataset is prepared from the packaged file)."""
    name = _field(data_cfg, "name")
    data_dir = _data_dir(data_cfg)
    if _base_name(name) == EMBEDDED:
        return embedded.ensure_prepared(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"config.data.name: unknown dataset {name!r}: {str(e).splitlines()[0]}") from e
    if not builder.is_prepared():
        raise DataError(_not_prepared_message(builder, name, data_dir))
    features = builder.info.features
    for key in ("image", "label"):
        if key not in features:
            raise DataError(
                f"dataset '{name}' has no '{key}' feature (features: {sorted(features.keys())}); "
                "only image classification datasets with 'image' and 'label' are supported"
            )
    return builder


def _check_tfds_split(builder: tfds.core.DatasetBuilder, data_cfg: Any, split: str) -> int:
    """Number of examples of ``split`` (which may carry a slice, e.g. 'train[:90%]')."""
    base = re.split(r"[\[+]", split)[0].strip()
    if base not in builder.info.splits:
        raise ConfigError(
            f"{_split_field(data_cfg, split)}: split {split!r} not in dataset '{builder.name}' "
            f"(available: {sorted(builder.info.splits.keys())})"
        )
    try:
        return int(builder.info.splits[split].num_examples)
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(f"{_split_field(data_cfg, split)}: invalid split {split!r}: {e}") from e


def _read_config() -> tfds.ReadConfig:
    options = tf.data.Options()
    options.deterministic = True
    return tfds.ReadConfig(options=options, try_autocache=False, skip_prefetch=True)


def _tfds_encoded(builder: tfds.core.DatasetBuilder, split: Any) -> tf.data.Dataset:
    """(encoded image bytes, int64 label) pairs of ``split`` in stored order."""
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=_read_config(),
    )
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64)))


def _tfds_decoder(builder: tfds.core.DatasetBuilder) -> Callable[[tf.Tensor], tf.Tensor]:
    feature = builder.info.features["image"]
    return lambda encoded: _to_rgb(feature.decode_example(encoded))


# --------------------------------------------------------------------------------------------- folder


def _folder_root(data_cfg: Any) -> str:
    return _data_dir(data_cfg) or ""


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _folder_classes(data_cfg: Any, split: str) -> list[str]:
    """Class names (sorted): the class folders of the train split, else of ``split``."""
    root = _folder_root(data_cfg)
    for s in (_field(data_cfg, "train_split"), split):
        d = os.path.join(root, s)
        if os.path.isdir(d):
            classes = _subdirs(d)
            if classes:
                return classes
    raise DataError(f"folder dataset {root}: no class folders under {os.path.join(root, split)}")


def _list_folder(data_cfg: Any, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(sorted file paths, int64 labels, class names) of ``root/<split>/<class>/*.{jpg,jpeg,png}``."""
    root = _folder_root(data_cfg)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(
            f"folder dataset {root}: split folder {split_dir} does not exist "
            f"({_split_field(data_cfg, split)}={split!r})"
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


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


# ------------------------------------------------------------------------------------------ dataset info


def dataset_info(data_cfg: Any) -> DatasetInfo:
    """Number of classes and examples per split.

    Never downloads: a TFDS dataset that is not prepared in ``config.data.data_dir`` is a ``DataError``.
    """
    validate_data_config(data_cfg)
    name = _field(data_cfg, "name")
    if name == FOLDER:
        root = _folder_root(data_cfg)
        splits = [s for s in _subdirs(root) if _subdirs(os.path.join(root, s))]
        wanted = [_field(data_cfg, "train_split"), _field(data_cfg, "eval_split")]
        if not any(s in splits for s in wanted):
            raise DataError(
                f"folder dataset {root}: neither {wanted[0]!r} nor {wanted[1]!r} exists as <split>/<class>/"
            )
        classes: list[str] = []
        counts = {}
        for split in splits:
            paths, _, classes = _list_folder(data_cfg, split)
            counts[split] = len(paths)
        return DatasetInfo(
            name=name, num_classes=len(classes), num_examples=counts, class_names=tuple(classes)
        )
    builder = _tfds_builder(data_cfg)
    label = builder.info.features["label"]
    counts = {str(k): int(v.num_examples) for k, v in builder.info.splits.items()}
    return DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        num_examples=counts,
        class_names=tuple(getattr(label, "names", ()) or ()),
    )


# -------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass
class _Source:
    """One process's share of a split: either held in memory (``items``) or streamed (``chunks``)."""

    description: str
    num_examples: int
    decode: Callable[[tf.Tensor], tf.Tensor]  # encoded item -> uint8 [H, W, 3]
    items: tf.Tensor | None = None  # tf.string [N]: file paths or encoded images
    labels: tf.Tensor | None = None  # tf.int64 [N]
    chunks: list[tf.data.Dataset] | None = None  # streamed: (encoded, label) pairs, each in a fixed order
    chunk_sizes: list[int] | None = None
    fallible: bool = False  # decoding may fail (files on disk): guard it
    on_corrupt: str = "skip"  # what a failed decode does: 'skip' (logged, counted) or 'fail' (DataError)


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


def _train_source(
    data_cfg: Any, *, local_batch: int, global_batch: int, process_index: int, process_count: int
) -> _Source:
    name = _field(data_cfg, "name")
    split = _field(data_cfg, "train_split")
    if name == FOLDER:
        paths, labels, _ = _list_folder(data_cfg, split)
        usable = len(paths) // process_count * process_count
        # Strided shard of the class-sorted list: every process sees every class.
        paths = paths[process_index:usable:process_count]
        labels = labels[process_index:usable:process_count]
        description = f"folder dataset {os.path.join(_folder_root(data_cfg), split)}"
        if len(paths) < local_batch:
            raise DataError(_too_small(description, len(paths), local_batch, global_batch, process_count))
        return _Source(
            description=description,
            num_examples=len(paths),
            decode=_decode_file,
            items=tf.constant(np.asarray(paths, dtype=object), tf.string),
            labels=tf.constant(labels, tf.int64),
            fallible=True,
            on_corrupt=_field(data_cfg, "on_corrupt"),
        )

    builder = _tfds_builder(data_cfg)
    total = _check_tfds_split(builder, data_cfg, split)
    description = f"dataset '{name}' split '{split}'"
    if total // process_count < local_batch:
        raise DataError(
            _too_small(description, total // process_count, local_batch, global_batch, process_count)
        )
    sub = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    n_local = int(builder.info.splits[sub].num_examples)
    whole = builder.info.splits[re.split(r"[\[+]", split)[0].strip()]
    num_bytes = int(whole.num_bytes or 0)
    share = num_bytes * n_local / max(1, int(whole.num_examples))  # estimated bytes held by this process
    in_memory = share <= IN_MEMORY_MAX_BYTES if num_bytes > 0 else n_local <= 200_000
    if in_memory:
        items, labels = _load_encoded(_tfds_encoded(builder, sub))
        if items.shape[0] != n_local:
            raise DataError(f"{description}: read {items.shape[0]} examples, dataset_info says {n_local}")
        return _Source(
            description=description,
            num_examples=n_local,
            decode=_tfds_decoder(builder),
            items=tf.constant(items, tf.string),
            labels=tf.constant(labels, tf.int64),
        )
    # Streamed: this process reads its own _STREAM_CHUNKS contiguous pieces of the split; every epoch merges
    # them in a random (seeded) interleaving, so any example can come at any point of an epoch.
    num_chunks = max(1, min(_STREAM_CHUNKS, n_local // 1000))
    pieces = tfds.even_splits(split, n=process_count * num_chunks, drop_remainder=True)
    pieces = pieces[process_index * num_chunks : (process_index + 1) * num_chunks]
    sizes = [int(builder.info.splits[p].num_examples) for p in pieces]
    log.info("%s: streaming %d examples per process (too large to hold in memory)", description, sum(sizes))
    return _Source(
        description=description,
        num_examples=sum(sizes),
        decode=_tfds_decoder(builder),
        chunks=[_tfds_encoded(builder, p) for p in pieces],
        chunk_sizes=sizes,
    )


# ------------------------------------------------------------------------------------- image processing


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    channels = image.shape[-1]
    if channels == 3:
        pass
    elif channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    else:
        image = tf.cond(
            tf.equal(tf.shape(image)[-1], 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3]
        )
    image.set_shape([None, None, 3])
    return image


def _resize(image: tf.Tensor, height: Any, width: Any) -> tf.Tensor:
    """Bicubic resize (antialiased when shrinking) of a uint8 image; float32 in [0, 1]."""
    resized = tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def _random_resized_crop(
    image: tf.Tensor, key: tf.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tf.Tensor:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
        seed=key,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    out = _resize(crop, size, size)
    out.set_shape([size, size, 3])
    return out


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the short side to ``size`` (bicubic), then crop the central ``size`` x ``size``."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = size / tf.reduce_min(shape)
    new_hw = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), size)
    out = _resize(image, new_hw[0], new_hw[1])
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    out = out[top : top + size, left : left + size, :]
    out.set_shape([size, size, 3])
    return out


def _fold(key: tf.Tensor, data: Any) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)


def _base_key(seed: int, domain: int) -> tf.Tensor:
    return tf.constant([int(seed) % (1 << 63), domain], tf.int64)


# ------------------------------------------------------------------------------------------- decoding


def _guarded_load(source: _Source, index: tf.Tensor, position: tf.Tensor, tries: int) -> tf.data.Dataset:
    """One element ``(index, position, try, image, label)``: the first decodable item among ``tries`` items
    from ``position`` on; ``try`` is 0 when the item itself decoded, -1 when none did."""
    n = tf.constant(source.num_examples, tf.int64)
    attempts = tf.data.Dataset.range(tries).map(lambda k: (k, (position + k) % n))
    attempts = attempts.map(
        lambda k, j: (k, source.decode(tf.gather(source.items, j)), tf.gather(source.labels, j))
    )
    attempts = attempts.ignore_errors().take(1)
    none = tf.data.Dataset.from_tensors(
        (tf.constant(-1, tf.int64), tf.zeros([1, 1, 3], tf.uint8), tf.constant(-1, tf.int64))
    )
    return attempts.concatenate(none).take(1).map(lambda k, image, label: (index, position, k, image, label))


def _report_unreadable(source: _Source, ds: tf.data.Dataset) -> tf.data.Dataset:
    items = source.items
    fail = tf.constant(source.on_corrupt == "fail")

    def report(index, position, k, image, label):
        if k != 0:
            tf.py_function(_note_unreadable, [tf.gather(items, position), fail], tf.int64)
        return index, k, image, label

    return (
        ds.map(report)
        .filter(lambda index, k, image, label: k >= 0)
        .map(lambda index, k, image, label: (index, image, label))
    )


def _decode_positions(source: _Source, ds: tf.data.Dataset, tries: int) -> tf.data.Dataset:
    """(index, position) -> (index, uint8 image, label), reading in-memory items; order is preserved."""
    if source.fallible:
        ds = ds.interleave(
            lambda index, position: _guarded_load(source, index, position, tries),
            cycle_length=8,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return _report_unreadable(source, ds)
    return ds.map(
        lambda index, position: (
            index,
            source.decode(tf.gather(source.items, position)),
            tf.gather(source.labels, position),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


# ------------------------------------------------------------------------------------------------ train


def train_iterator(
    data_cfg: Any,
    *,
    image_size: int,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator over this process's share of each global batch.

    Yields ``{"image": float32 [global_batch // process_count, image_size, image_size, 3] in [0, 1],
    "label": int32 [global_batch // process_count]}``, augmented with RandomResizedCrop (bicubic) and a
    horizontal flip. The stream is a pure function of (dataset, seed, process_index, process_count);
    ``start_step=k`` yields exactly the batches ``k, k+1, ...`` of the uninterrupted stream.
    """
    validate_data_config(data_cfg)
    _check_positive_int(image_size, "image_size")
    _check_positive_int(global_batch, "global_batch")
    if not _is_int(seed):
        raise ConfigError(f"seed: expected an int, got {seed!r}")
    if not _is_int(start_step) or start_step < 0:
        raise ConfigError(f"start_step: expected an int >= 0, got {start_step!r}")
    process_index, process_count = _process(process_index, process_count)
    if global_batch % process_count:
        raise ConfigError(
            f"global_batch: {global_batch} is not divisible by the number of processes ({process_count})"
        )
    local_batch = global_batch // process_count
    source = _train_source(
        data_cfg,
        local_batch=local_batch,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )
    scale = _pair(data_cfg, "crop_scale")
    ratio = _pair(data_cfg, "crop_ratio")
    flip = bool(_field(data_cfg, "flip"))
    n = source.num_examples
    first = int(start_step) * local_batch  # index (in this process's stream) of the first element to yield
    first_epoch, offset = divmod(first, n)
    perm_key = _fold(_fold(_base_key(seed, _PERM_DOMAIN), process_count), process_index)
    aug_key = _base_key(seed, _AUG_DOMAIN)

    epochs = tf.data.Dataset.range(first_epoch, _FOREVER)
    indices = tf.data.Dataset.range(first, _FOREVER)
    if source.chunks is None:
        positions = epochs.flat_map(
            lambda e: tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(
                    tf.range(n, dtype=tf.int64), _fold(perm_key, e), alg=_ALG
                )
            )
        ).skip(offset)
        ds = _decode_positions(source, tf.data.Dataset.zip(indices, positions), tries=_MAX_FALLBACKS)
    else:
        chunks = source.chunks
        chunk_ids = tf.constant(np.repeat(np.arange(len(chunks)), source.chunk_sizes), tf.int64)
        buffer = min(int(_field(data_cfg, "shuffle_buffer")), n)

        def epoch_stream(e: tf.Tensor) -> tf.data.Dataset:
            key = _fold(perm_key, e)
            keys = tf.random.experimental.stateless_split(key, 2, alg=_ALG)
            order = tf.random.experimental.stateless_shuffle(chunk_ids, keys[0], alg=_ALG)
            merged = tf.data.Dataset.choose_from_datasets(chunks, tf.data.Dataset.from_tensor_slices(order))
            shuffle_seed = tf.random.stateless_uniform(
                [], seed=keys[1], minval=None, maxval=None, dtype=tf.int64, alg=_ALG
            )
            return merged.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

        encoded = epochs.flat_map(epoch_stream).skip(offset)  # skipped records are never decoded
        ds = tf.data.Dataset.zip(indices, encoded).map(
            lambda index, record: (index, source.decode(record[0]), record[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def augment(index: tf.Tensor, image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        key = _fold(aug_key, index * process_count + process_index)  # global element index
        keys = tf.random.experimental.stateless_split(key, 2, alg=_ALG)
        out = _random_resized_crop(image, keys[0], image_size, scale, ratio)
        if flip:
            out = tf.image.stateless_random_flip_left_right(out, seed=keys[1])
        return {"image": out, "label": tf.cast(label, tf.int32)}

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    prefetch = int(_field(data_cfg, "prefetch"))
    if prefetch:
        ds = ds.prefetch(prefetch)
    ds = ds.with_options(_options())
    return _translate_errors(iter(tfds.as_numpy(ds)))


# ------------------------------------------------------------------------------------------------- eval


def _pad_batches(batches: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for batch in batches:
        n = batch["label"].shape[0]
        mask = np.zeros([batch_size], bool)
        mask[:n] = True
        if n < batch_size:
            image = np.zeros((batch_size,) + batch["image"].shape[1:], batch["image"].dtype)
            image[:n] = batch["image"]
            label = np.zeros([batch_size], batch["label"].dtype)
            label[:n] = batch["label"]
            batch = {"image": image, "label": label}
        yield {"image": batch["image"], "label": batch["label"], "mask": mask}


def eval_iterator(
    data_cfg: Any,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    max_examples: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over ``split`` (or its first ``max_examples``): short-side resize + center crop.

    Yields ``{"image": float32 [batch_size, image_size, image_size, 3] in [0, 1], "label": int32
    [batch_size], "mask": bool [batch_size]}``; the last batch is zero-padded and ``mask`` marks the real
    examples. Unreadable files of a folder dataset are skipped (and reported on stderr).
    """
    validate_data_config(data_cfg)
    _check_positive_int(image_size, "image_size")
    _check_positive_int(batch_size, "batch_size")
    if max_examples is not None:
        _check_positive_int(max_examples, "max_examples")
    if not isinstance(split, str) or not split.strip():
        raise ConfigError(f"config.data.eval_split: expected a split name, got {split!r}")
    name = _field(data_cfg, "name")
    if name == FOLDER:
        paths, labels, _ = _list_folder(data_cfg, split)
        # A fixed (seed-independent) order that mixes the classes: a max_examples prefix is representative.
        order = np.random.default_rng(0).permutation(len(paths))
        if max_examples is not None:
            order = order[:max_examples]
        source = _Source(
            description=f"folder dataset {os.path.join(_folder_root(data_cfg), split)}",
            num_examples=len(paths),
            decode=_decode_file,
            items=tf.constant(np.asarray(paths, dtype=object), tf.string),
            labels=tf.constant(labels, tf.int64),
            fallible=True,
            on_corrupt=_field(data_cfg, "on_corrupt"),
        )
        positions = tf.data.Dataset.from_tensor_slices(tf.constant(order, tf.int64))
        ds = _decode_positions(source, positions.enumerate(), tries=1)
        ds = ds.map(lambda index, image, label: (image, label))
    else:
        builder = _tfds_builder(data_cfg)
        _check_tfds_split(builder, data_cfg, split)
        decode = _tfds_decoder(builder)
        ds = _tfds_encoded(builder, split)
        if max_examples is not None:
            ds = ds.take(max_examples)
        ds = ds.map(lambda enc, label: (decode(enc), label), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(
        lambda image, label: {"image": _center_crop(image, image_size), "label": tf.cast(label, tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(batch_size).prefetch(max(1, int(_field(data_cfg, "prefetch"))))
    ds = ds.with_options(_options())
    return _translate_errors(_pad_batches(tfds.as_numpy(ds), batch_size))

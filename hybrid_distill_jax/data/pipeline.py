"""Deterministic tf.data input pipelines for training and evaluation, fed from ``sources``.

Training: a per-process source of *encoded* examples -> a per-epoch order that is a pure function of
(seed, epoch, process) -> skip to ``start_step`` (before any decoding) -> RandomResizedCrop + flip driven
by seeds that are a pure function of (seed, process, element index), drawn a block of elements at a time
-> uint8 batches. The stream therefore depends only on
the dataset, the seed and the process index/count, and a resumed iterator yields exactly what the
uninterrupted one would have.

* In memory (folder file paths, or the encoded images of a TFDS split whose per-process share is at most
  ``formats.tfds.IN_MEMORY_MAX_BYTES``): each epoch is a full random permutation, and skipping is free.
* Streamed (large TFDS splits such as ImageNet): each process reads ``formats.tfds.STREAM_CHUNKS`` contiguous
  pieces of the split, merged every epoch in a seeded random interleaving and mixed by a shuffle buffer of
  ``config.data.shuffle_buffer`` elements seeded per epoch; resuming re-reads, without decoding, the records
  of the current epoch before ``start_step``.

A JPEG is decoded only inside its sampled crop box (``decode_and_crop_jpeg``; the box needs only the header),
other formats are decoded whole and cropped. Batches leave the host as uint8: conversion to float and each
model's normalisation happen on the device (``models.build.normalize``).

Unreadable files (folder datasets) never break the stream: a file that is not an image is flagged without
decoding, one that fails to decode is dropped by ``ignore_errors``; the host side (``_UnreadableGuard``)
puts the next readable file of the source in its place, so every element index keeps exactly one example
and resuming stays exact. Too many unreadable files, and a source that yields nothing for
``config.data.stall_timeout_s``, end the run with a ``DataError`` instead of a silent hang. A TFDS split's
damaged record shards (missing, cut short, not TFRecords, unreadable) are a ``DataError`` naming them.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hybrid_distill_jax.data import sources
from hybrid_distill_jax.data.sources import (  # re-exported: the package's public data API
    DatasetInfo,
    dataset_info,
    field,
    is_int,
    validate_data_config,
)
from hybrid_distill_jax.errors import ConfigError, DataError

__all__ = ["DatasetInfo", "dataset_info", "eval_iterator", "train_iterator", "unreadable_files"]
__all__ += ["validate_data_config"]

_FOREVER = 1 << 62
_PERM_DOMAIN = 0x5EED_0001
_AUG_DOMAIN = 0x5EED_0002
_ALG = "philox"
# Resuming a streamed split re-reads the records before start_step: the first batch may take this many
# extra seconds per skipped record before the stall watchdog gives up.
_SKIP_SECONDS_PER_RECORD = 1 / 2000

# Unreadable files met by the pipelines of this process, in the order met (logged by the trainer).
_UNREADABLE: list[str] = []


def unreadable_files() -> list[str]:
    """Names of the unreadable images skipped so far in this process."""
    return list(_UNREADABLE)


def _check_positive_int(value: Any, what: str) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{what}: expected an int >= 1, got {value!r}")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not is_int(process_count) or process_count < 1:
        raise ConfigError(f"process_count: expected an int >= 1, got {process_count!r}")
    if not is_int(process_index) or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index: expected an int in [0, {process_count}), got {process_index!r}")
    return int(process_index), int(process_count)


# ------------------------------------------------------------------------------------- image processing

# File signatures, JPEG first: ``_file_kind`` returns the index of the first that matches, else this:
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM")
_NOT_AN_IMAGE = len(_SIGNATURES)
# Float resizes whose weights are all >= 0: their output stays within the input's [0, 255] (no clipping).
_CONVEX_RESIZES = ("bilinear", "area")
# Per-element augmentation seeds are drawn in blocks of this many elements (one Philox call per block).
_SEED_BLOCK = 1024


def _file_kind(encoded: tf.Tensor) -> tf.Tensor:
    """0 for a JPEG, 1-3 for PNG/GIF/BMP, ``_NOT_AN_IMAGE`` otherwise, from the first bytes alone: never
    fails, decodes nothing, a handful of ops (this runs once per training example)."""
    heads = tf.strings.substr(encoded, [0] * len(_SIGNATURES), [len(s) for s in _SIGNATURES])
    matches = tf.concat([tf.equal(heads, _SIGNATURES), [True]], 0)
    return tf.argmax(tf.cast(matches, tf.int32), output_type=tf.int32)


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _to_uint8(image: tf.Tensor, clip: bool = True) -> tf.Tensor:
    """Rounded to uint8; ``clip=False`` for the output of a ``_CONVEX_RESIZES`` resize of uint8 pixels,
    which cannot leave [0, 255] (two passes over the image fewer)."""
    rounded = tf.round(image)
    return tf.cast(tf.clip_by_value(rounded, 0.0, 255.0) if clip else rounded, tf.uint8)


def _random_crop(
    encoded: tf.Tensor,
    kind: tf.Tensor,
    key: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    blank: tf.Tensor | None = None,
) -> tf.Tensor:
    """The RandomResizedCrop box of ``encoded`` (uint8 [h, w, 3]) of ``_file_kind`` ``kind``, decoding
    only the box of a JPEG; ``blank`` stands in for a file that is not an image (else it is decoded, and
    fails)."""

    def box(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
            seed=key,
            min_object_covered=0.0,
            aspect_ratio_range=ratio,
            area_range=scale,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return begin, size

    def jpeg():
        begin, size = box(tf.image.extract_jpeg_shape(encoded))
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = _decode(encoded)
        begin, size = box(tf.shape(image))
        return tf.slice(image, begin, tf.concat([size[:2], [3]], 0))

    branches = [jpeg] + [other] * (len(_SIGNATURES) - 1) + [other if blank is None else lambda: blank]
    crop = tf.switch_case(kind, branches)
    crop.set_shape([None, None, 3])
    return crop


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased), then crop the central ``size`` x ``size``."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = size / tf.reduce_min(shape)
    new_hw = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), size)
    out = _to_uint8(tf.image.resize(image, new_hw, method="bicubic", antialias=True))
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    out = out[top : top + size, left : left + size, :]
    out.set_shape([size, size, 3])
    return out


def _fold(key: tf.Tensor, data: Any) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)


def _base_key(seed: int, domain: int) -> tf.Tensor:
    return tf.constant([int(seed) % (1 << 63), domain], tf.int64)


def _seed_block(key: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
    """int64 [_SEED_BLOCK, 3]: row i holds element ``block * _SEED_BLOCK + i``'s crop seed (columns 0-1)
    and flip bit (column 2, lowest bit)."""
    return tf.random.stateless_uniform(
        [_SEED_BLOCK, 3], seed=_fold(key, block), minval=None, maxval=None, dtype=tf.int64, alg=_ALG
    )


def _element_seeds(key: tf.Tensor, element: tf.Tensor) -> tf.Tensor:
    """Row ``element`` of the ``_seed_block`` stream: what the pipeline uses for that element."""
    return _seed_block(key, element // _SEED_BLOCK)[element % _SEED_BLOCK]


def _seed_stream(key: tf.Tensor, first: int) -> tf.data.Dataset:
    """``_element_seeds(key, e)`` for e = first, first + 1, ...: one Philox call per block of elements."""
    blocks = tf.data.Dataset.range(first // _SEED_BLOCK, _FOREVER).map(lambda b: _seed_block(key, b))
    return blocks.unbatch().skip(first % _SEED_BLOCK)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


# ------------------------------------------------------------------------------ unreadable files, stalls


class _UnreadableGuard:
    """Host-side handling of a fallible source's unreadable items: reports them, applies
    ``config.data.on_corrupt`` and the limits, and builds the example that stands in for one."""

    def __init__(self, source: sources.Source, data_cfg: Any, example: Callable | None = None):
        self.source = source
        self.example = example
        self.max_consecutive = int(field(data_cfg, "max_consecutive_unreadable"))
        self.max_fraction = float(field(data_cfg, "max_unreadable_fraction"))
        self.bad: dict[int, str] = {}  # position -> name

    def _examples(self, positions) -> str:
        return ", ".join(self.source.item_name(p) for p in list(positions)[:3])

    def note(self, position: int) -> None:
        name = self.source.item_name(position)
        if self.source.on_corrupt == "fail":
            raise DataError(f"unreadable image {name} (config.data.on_corrupt='fail'; use 'skip' to skip it)")
        if position in self.bad:
            return
        self.bad[position] = name
        if name not in _UNREADABLE:
            _UNREADABLE.append(name)
            print(f"hybrid_distill_jax.data: skipping unreadable image {name}", file=sys.stderr, flush=True)
        n = self.source.num_examples
        if len(self.bad) > max(self.max_fraction * n, 1):  # one bad file in a tiny folder is no trend
            raise DataError(
                f"{self.source.description}: {len(self.bad)} of its {n} images are unreadable, more than "
                f"config.data.max_unreadable_fraction={self.max_fraction:g} (e.g. {self._examples(self.bad)})"
            )

    def replacement(self, element: int, position: int) -> dict[str, np.ndarray]:
        """Element ``element`` of the stream built from the first readable item after ``position``."""
        self.note(position)
        run = [position]
        n = self.source.num_examples
        for k in range(1, n):
            if len(run) > self.max_consecutive:
                raise DataError(
                    f"{self.source.description}: {len(run)} consecutive unreadable images, more than "
                    f"config.data.max_consecutive_unreadable={self.max_consecutive} "
                    f"(e.g. {self._examples(run)})"
                )
            p = (position + k) % n
            try:
                example = self.example(tf.constant(element, tf.int64), tf.constant(p, tf.int64))
                out = {k2: v.numpy() for k2, v in example.items()}
            except tf.errors.OpError:
                out = None
            if out is not None and out.pop("_ok"):
                out.pop("_element")
                return out
            self.note(p)
            run.append(p)
        raise DataError(
            f"{self.source.description}: none of its {n} images is readable (e.g. {self._examples(run)})"
        )


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _repaired(
    batches: Iterator[dict[str, np.ndarray]],
    guard: _UnreadableGuard,
    position_of: Callable[[int], int],
    first: int,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches with exactly one example per element index from ``first`` on: elements flagged not ok or
    dropped by ``ignore_errors`` are replaced by ``guard``; batches without either pass through untouched."""
    expected = first
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for batch in batches:
        element = batch.pop("_element")
        ok = batch.pop("_ok")
        if not pending and ok.all() and element[0] == expected and element[-1] == expected + len(element) - 1:
            expected += len(element)
            yield batch
            continue
        run_start = 0
        for j, e in enumerate(element.tolist() + [None]):
            end_of_run = e is None or e != expected or not ok[j]
            if end_of_run and j > run_start:
                pending.append({k: v[run_start:j] for k, v in batch.items()})
                pending_rows += j - run_start
            if e is None:
                break
            if end_of_run:
                while expected < e:  # dropped by ignore_errors
                    pending.append(
                        {k: v[None] for k, v in guard.replacement(expected, position_of(expected)).items()}
                    )
                    pending_rows += 1
                    expected += 1
                if not ok[j]:
                    pending.append({k: v[None] for k, v in guard.replacement(e, position_of(e)).items()})
                    pending_rows += 1
                    run_start = j + 1
                else:
                    run_start = j
            expected = e + 1
        while pending_rows >= batch_size:
            merged = _concat(pending)
            yield {k: v[:batch_size] for k, v in merged.items()}
            pending_rows -= batch_size
            pending = [{k: v[batch_size:] for k, v in merged.items()}] if pending_rows else []


def _naming_files(batches: Iterator[Any], source: sources.Source) -> Iterator[Any]:
    """``batches``, where a TensorFlow error reading ``source``'s records is a DataError naming its files."""
    try:
        yield from batches
    except (tf.errors.ResourceExhaustedError, tf.errors.CancelledError):  # the host's trouble, not the files'
        raise
    except tf.errors.OpError as e:
        raise sources.read_error(e, source.description, source.files) from e


def _watched(
    batches: Iterator[dict[str, np.ndarray]], description: str, timeout_s: float, first_timeout_s: float
) -> Iterator[dict[str, np.ndarray]]:
    """Runs ``batches`` in a thread (the host work overlaps the caller's) and turns a wait longer than
    ``timeout_s`` (``first_timeout_s`` for the first batch) into a ``DataError`` naming the source."""
    out: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for batch in batches:
                if not put(("batch", batch)):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put(("error", e))

    threading.Thread(target=work, name="hybrid_distill_jax-data", daemon=True).start()
    wait = first_timeout_s
    try:
        while True:
            try:
                kind, item = out.get(timeout=wait)
            except queue.Empty:
                raise DataError(
                    f"{description}: no batch arrived in {wait:g} s (config.data.stall_timeout_s="
                    f"{timeout_s:g}); the source may be unreadable, empty or on a stalled file system"
                ) from None
            if kind == "error":
                raise item
            yield item
            wait = timeout_s
    finally:
        stop.set()


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

    Yields ``{"image": uint8 [global_batch // process_count, image_size, image_size, 3], "label": int32 [B],
    "index": int64 [B]}`` (``index``: each example's index in the split, for folders its position in the
    sorted file list), augmented with RandomResizedCrop and a horizontal flip. The stream is a pure function
    of (dataset, seed, process_index, process_count); ``start_step=k`` yields exactly the batches
    ``k, k+1, ...`` of the uninterrupted stream. ``data_cfg``, ``image_size``, ``global_batch`` and ``seed``
    are a config's, checked by ``config_lib.validate`` (``validate_data_config`` for ``data_cfg`` alone).
    """
    if not is_int(start_step) or start_step < 0:
        raise ConfigError(f"start_step: expected an int >= 0, got {start_step!r}")
    process_index, process_count = _process(process_index, process_count)
    if global_batch % process_count:
        raise ConfigError(
            f"global_batch: {global_batch} is not divisible by the number of processes ({process_count})"
        )
    local_batch = global_batch // process_count
    source = sources.train_source(data_cfg, local_batch, global_batch, process_index, process_count)
    scale = sources.pair(data_cfg, "crop_scale")
    ratio = sources.pair(data_cfg, "crop_ratio")
    flip = bool(field(data_cfg, "flip"))
    method = field(data_cfg, "resize_method")
    antialias = bool(field(data_cfg, "antialias"))
    n = source.num_examples
    first = int(start_step) * local_batch  # index (in this process's stream) of the first element to yield
    first_epoch, offset = divmod(first, n)
    perm_key = _fold(_fold(_base_key(seed, _PERM_DOMAIN), process_count), process_index)
    aug_key = _fold(_fold(_base_key(seed, _AUG_DOMAIN), process_count), process_index)
    exact_range = method in _CONVEX_RESIZES

    def augment(encoded: tf.Tensor, kind: tf.Tensor, seeds: tf.Tensor, blank=None) -> tf.Tensor:
        crop = _random_crop(encoded, kind, seeds[:2], scale, ratio, blank)
        out = tf.image.resize(crop, [image_size, image_size], method=method, antialias=antialias)
        out = _to_uint8(out, clip=not exact_range)
        if flip:  # a branch: reversing costs twice as much as the cond, and reversing no axis still copies
            out = tf.cond(seeds[2] % 2 == 1, lambda: tf.reverse(out, [1]), lambda: out)
        out.set_shape([image_size, image_size, 3])
        return out

    def epoch_order(e: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), _fold(perm_key, e), alg=_ALG
        )

    epochs = tf.data.Dataset.range(first_epoch, _FOREVER)
    skipped_records = 0
    if source.chunks is None:
        items, labels = source.items, source.labels

        def example(element, position, seeds):
            item = tf.gather(items, position)
            encoded = tf.io.read_file(item) if source.from_files else item
            out = {
                "label": tf.cast(tf.gather(labels, position), tf.int32),
                "index": source.id_start + position * source.id_stride,
            }
            kind = _file_kind(encoded)
            if not source.fallible:
                return dict(out, image=augment(encoded, kind, seeds))
            # A file that is not an image is flagged, not decoded, and replaced on the host.
            image = augment(encoded, kind, seeds, blank=tf.zeros([1, 1, 3], tf.uint8))
            return dict(out, image=image, _element=element, _ok=kind < _NOT_AN_IMAGE)

        elements = tf.data.Dataset.range(first, _FOREVER)
        positions = epochs.flat_map(lambda e: tf.data.Dataset.from_tensor_slices(epoch_order(e))).skip(offset)
        ds = tf.data.Dataset.zip(elements, positions, _seed_stream(aug_key, first)).map(
            example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        if source.fallible:
            ds = ds.ignore_errors()  # a file that fails to decode leaves a gap, filled on the host
    else:
        chunks = source.chunks
        chunk_ids = tf.constant(np.repeat(np.arange(len(chunks)), source.chunk_sizes), tf.int64)
        buffer = min(int(field(data_cfg, "shuffle_buffer")), n)

        def epoch_stream(e: tf.Tensor) -> tf.data.Dataset:
            key = _fold(perm_key, e)
            keys = tf.random.experimental.stateless_split(key, 2, alg=_ALG)
            order = tf.random.experimental.stateless_shuffle(chunk_ids, keys[0], alg=_ALG)
            merged = tf.data.Dataset.choose_from_datasets(chunks, tf.data.Dataset.from_tensor_slices(order))
            shuffle_seed = tf.random.stateless_uniform(
                [], seed=keys[1], minval=None, maxval=None, dtype=tf.int64, alg=_ALG
            )
            return merged.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

        records = epochs.flat_map(epoch_stream).skip(offset)  # skipped records are never decoded
        # Records read ahead: parsing and decoding go on while the next epoch's shuffle buffer fills.
        records = records.prefetch(2 * local_batch)
        skipped_records = offset

        def parsed_example(numbered, seeds):
            index, record = numbered
            encoded, label = source.parse_record(record)
            image = augment(encoded, _file_kind(encoded), seeds)
            return {"image": image, "label": tf.cast(label, tf.int32), "index": index}

        ds = tf.data.Dataset.zip(records, _seed_stream(aug_key, first)).map(
            parsed_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    ds = ds.batch(local_batch, drop_remainder=True)
    prefetch = int(field(data_cfg, "prefetch"))
    if prefetch:
        ds = ds.prefetch(prefetch)
    batches = iter(tfds.as_numpy(ds.with_options(_options())))
    if source.fallible:
        orders: dict[int, np.ndarray] = {}

        def position_of(element: int) -> int:
            e, i = divmod(element, n)
            if e not in orders:
                orders.clear()
                orders[e] = epoch_order(tf.constant(e, tf.int64)).numpy()
            return int(orders[e][i])

        guard = _UnreadableGuard(
            source, data_cfg, tf.function(lambda e, p: example(e, p, _element_seeds(aug_key, e)))
        )
        batches = _repaired(batches, guard, position_of, first, local_batch)
    else:
        batches = _naming_files(batches, source)
    timeout = float(field(data_cfg, "stall_timeout_s"))
    return _watched(
        batches, source.description, timeout, timeout + skipped_records * _SKIP_SECONDS_PER_RECORD
    )


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


def _reporting_skips(
    batches: Iterator[dict[str, np.ndarray]], guard: _UnreadableGuard, order: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Reports the elements missing from ``batches`` (unreadable files of ``order``) to ``guard``."""
    expected = 0
    for batch in batches:
        for e in batch.pop("_element").tolist():
            for missing in range(expected, e):
                guard.note(int(order[missing]))
            expected = e + 1
        yield batch
    for missing in range(expected, len(order)):
        guard.note(int(order[missing]))


def eval_iterator(
    data_cfg: Any,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    max_examples: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over ``split`` (or its first ``max_examples``): short-side resize + center crop.

    Yields ``{"image": uint8 [batch_size, image_size, image_size, 3], "label": int32 [batch_size],
    "mask": bool [batch_size]}``; the last batch is zero-padded and ``mask`` marks the real examples.
    Unreadable files of a folder dataset are skipped (and reported on stderr). ``data_cfg`` is checked
    (``validate_data_config``) before.
    """
    _check_positive_int(image_size, "image_size")
    _check_positive_int(batch_size, "batch_size")
    if max_examples is not None:
        _check_positive_int(max_examples, "max_examples")
    if not isinstance(split, str) or not split.strip():
        raise ConfigError(f"config.data.eval_split: expected a split name, got {split!r}")
    source = sources.eval_source(data_cfg, split)

    def crop(image, label):
        return {"image": _center_crop(image, image_size), "label": tf.cast(label, tf.int32)}

    if source.records is None:
        # A fixed (seed-independent) order that mixes the classes: a max_examples prefix is representative.
        order = np.random.default_rng(0).permutation(source.num_examples)[:max_examples]
        items, labels = source.items, source.labels

        def load(element, position):
            encoded = tf.io.read_file(tf.gather(items, position))
            ok = _file_kind(encoded) < _NOT_AN_IMAGE
            image = tf.cond(ok, lambda: _decode(encoded), lambda: tf.zeros([1, 1, 3], tf.uint8))
            return dict(crop(image, tf.gather(labels, position)), _element=element, _ok=ok)

        ds = tf.data.Dataset.from_tensor_slices(tf.constant(order, tf.int64)).enumerate()
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        ds = ds.filter(lambda ex: ex["_ok"]).map(lambda ex: {k: v for k, v in ex.items() if k != "_ok"})
    else:
        encoded = source.records
        if max_examples is not None:
            encoded = encoded.take(max_examples)
        ds = encoded.map(
            lambda enc, label: crop(_decode(enc), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(batch_size).prefetch(max(1, int(field(data_cfg, "prefetch"))))
    batches = iter(tfds.as_numpy(ds.with_options(_options())))
    if source.records is None:
        batches = _reporting_skips(batches, _UnreadableGuard(source, data_cfg), order)
    else:
        batches = _naming_files(batches, source)
    return _pad_batches(batches, batch_size)

"""A TFDS dataset stored as ArrayRecord (``tfds build --file_format=array_record``) against its TFRecord copy:
the same examples under the same ids, the same augmented batches, exact resumes, and a damaged shard named
in one line."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from hybrid_distill_jax.data import eval_iterator, train_iterator
from hybrid_distill_jax.data.formats import tfds as tfds_format
from hybrid_distill_jax.errors import DataError
from tests.helpers import prepare_numbered_tfds
from tests.integration.test_data import _take

EXAMPLES, SHARDS = 2000, 4  # 2 streamed pieces for one process, 1 each for two
FORMATS = ("tfrecord", "array_record")


def _pixels(i: int) -> np.ndarray:
    """A solid 8x8 image whose red and green levels spell ``i``: every crop and resize of it keeps them."""
    return np.broadcast_to(np.array([i % 256, i // 256, 0], np.uint8), (8, 8, 3)).copy()


def _numbers(images: np.ndarray) -> np.ndarray:
    """The number of the example each image shows (inverse of ``_pixels``)."""
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def _prepare(data_dir: str, file_format: str) -> str:
    """The ``EXAMPLES`` numbered images, label ``i % 3``, prepared by TFDS in ``file_format`` shards; returns
    the version directory (read without builder code)."""
    return prepare_numbered_tfds(data_dir, [_pixels(i) for i in range(EXAMPLES)], SHARDS, file_format)


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, str]:
    """{'tfrecord': version dir, 'array_record': version dir} of the same dataset."""
    root = tmp_path_factory.mktemp("formats")
    dirs = {fmt: _prepare(str(root / fmt), fmt) for fmt in FORMATS}
    shards = [f for f in os.listdir(dirs["array_record"]) if ".array_record-" in f]
    assert len(shards) == SHARDS and tfds.builder_from_directory(
        dirs["array_record"]
    ).info.file_format.value == ("array_record")
    return dirs


@pytest.fixture(scope="module")
def stored(copies) -> np.ndarray:
    """The example numbers in stored order (TFDS shuffles them by key), read from the ArrayRecord shards with
    array_record's own reader: ``stored[i]`` is the example whose id (``index``) is ``i``."""
    from array_record.python.array_record_module import ArrayRecordReader

    numbers = []
    directory = copies["array_record"]
    for shard in sorted(f for f in os.listdir(directory) if ".array_record-" in f):
        for record in ArrayRecordReader(os.path.join(directory, shard)).read_all():
            png = tf.train.Example.FromString(record).features.feature["image"].bytes_list.value[0]
            numbers.append(_numbers(np.asarray(Image.open(io.BytesIO(png)))[None])[0])
    assert sorted(numbers) == list(range(EXAMPLES)) and numbers != sorted(numbers)
    return np.asarray(numbers)


def _cfg(directory: str, **overrides) -> dict:
    return dict(name=directory, data_dir=None, train_split="train", eval_split="train", **overrides)


def _stream(monkeypatch) -> None:
    """Streams the split from its shards, as an ImageNet-size split is (else it is held in memory)."""
    monkeypatch.setattr(tfds_format, "IN_MEMORY_MAX_BYTES", 0)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("streamed", [False, True])
def test_batches_match_the_tfrecord_copy_element_by_element(copies, stored, monkeypatch, streamed):
    if streamed:
        _stream(monkeypatch)
    kw = dict(image_size=8, global_batch=64, seed=5, process_index=0, process_count=1)
    batches = {fmt: _take(train_iterator(_cfg(copies[fmt]), **kw), 34) for fmt in FORMATS}  # > 1 epoch
    _assert_same(batches["tfrecord"], batches["array_record"])
    for batch in batches["array_record"]:  # each id is the place in the split of the example it comes with
        np.testing.assert_array_equal(_numbers(batch["image"]), stored[batch["index"]])
        np.testing.assert_array_equal(batch["label"], stored[batch["index"]] % 3)
    evals = {
        fmt: list(eval_iterator(_cfg(copies[fmt]), "train", image_size=8, batch_size=300)) for fmt in FORMATS
    }
    _assert_same(evals["tfrecord"], evals["array_record"])
    shown = np.concatenate([_numbers(b["image"][b["mask"]]) for b in evals["array_record"]])
    np.testing.assert_array_equal(shown, stored)  # evaluation reads the split once, in stored order


def test_per_host_splits_are_disjoint_and_complete(copies, stored, monkeypatch):
    _stream(monkeypatch)
    seen = []
    for p in range(2):
        # 1,000 examples per process, 50 per batch: one epoch is 20 batches.
        it = train_iterator(
            _cfg(copies["array_record"]),
            image_size=8,
            global_batch=100,
            seed=0,
            process_index=p,
            process_count=2,
        )
        batches = _take(it, 20)
        ids = np.concatenate([b["index"] for b in batches])
        np.testing.assert_array_equal(np.concatenate([_numbers(b["image"]) for b in batches]), stored[ids])
        assert len(set(ids.tolist())) == len(ids) == EXAMPLES // 2  # each of its examples once per epoch
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(EXAMPLES))


def test_a_resume_past_an_epoch_boundary_is_exact(copies, monkeypatch):
    _stream(monkeypatch)
    cfg = _cfg(copies["array_record"])  # 2,000 examples, 64 per batch: the first epoch ends inside batch 31
    kw = dict(image_size=8, global_batch=64, seed=11, process_index=0, process_count=1)
    full = _take(train_iterator(cfg, **kw), 36)
    for k in (31, 33):
        _assert_same(_take(train_iterator(cfg, start_step=k, **kw), 36 - k), full[k:])


def _flip_a_record_byte(path: str) -> None:
    """One byte of the first record's chunk: the file still opens, reading that chunk fails its hash."""
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))


DAMAGES = {
    "missing": os.remove,
    "truncated": lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2),
    "random_bytes": lambda p: open(p, "wb").write(np.random.default_rng(0).bytes(os.path.getsize(p))),
    "damaged_record": _flip_a_record_byte,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_shard_is_one_line_naming_it(copies, tmp_path, monkeypatch, capfd, damage):
    copy = str(tmp_path / "copy")
    shutil.copytree(copies["array_record"], copy)
    shard = os.path.join(copy, sorted(f for f in os.listdir(copy) if ".array_record-" in f)[2])
    DAMAGES[damage](shard)
    kw = dict(image_size=8, global_batch=64, seed=0, process_index=0, process_count=1)
    readers = {
        "in memory": lambda: train_iterator(_cfg(copy), **kw),
        "streamed": lambda: _take(train_iterator(_cfg(copy), **kw), 32),  # one epoch reads every shard
        "eval": lambda: list(eval_iterator(_cfg(copy), "train", image_size=8, batch_size=64)),
    }
    for name, read in readers.items():
        if name == "streamed":
            _stream(monkeypatch)
        with pytest.raises(DataError) as e:
            read()
        message = str(e.value)
        assert "\n" not in message and f"cannot read {shard} (" in message, (name, message)
    assert "Traceback" not in capfd.readouterr().err  # TensorFlow logs the error: one line, no Python trace

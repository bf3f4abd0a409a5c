"""Tests of the data pipelines (embedded TFDS dataset, local folders, config validation)."""

from __future__ import annotations

import collections
import hashlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image

from hybrid_distill_jax.data import (
    DatasetInfo,
    dataset_info,
    embedded,
    ensure_prepared,
    eval_iterator,
    sources,
    train_iterator,
    validate_data_config,
)
from hybrid_distill_jax.data.formats import tfds as tfds_format
from hybrid_distill_jax.errors import ConfigError, DataError
from tests.helpers import prepare_numbered_tfds


def _cfg(**overrides):
    base = dict(
        name="embedded_fashion_mnist",
        data_dir=None,
        train_split="train",
        eval_split="test",
        crop_scale=(0.2, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        flip=True,
        shuffle_buffer=512,
        prefetch=2,
    )
    base.update(overrides)
    return ConfigDict(base)


# The crop covers the whole image and 28px stays 28px: the output pixels are the stored ones.
_IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)


def _hashes(images: np.ndarray) -> list[str]:
    """Per-image hashes of float [0,1] images (as uint8) or uint8 images."""
    if images.dtype != np.uint8:
        images = np.round(images * 255.0).astype(np.uint8)
    return [hashlib.sha1(im.tobytes()).hexdigest() for im in images]


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    ensure_prepared(d)
    return d


@pytest.fixture(scope="module")
def test_split_hashes():
    images, labels = embedded.load_embedded_arrays("test")
    rgb = np.repeat(images[..., None], 3, axis=-1)
    return collections.Counter(zip(_hashes(rgb), labels.tolist(), strict=True))


# ------------------------------------------------------------------------------------------- embedded


def test_embedded_builder_prepares_and_reads_through_tfds(data_dir):
    def files():
        return {
            os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(data_dir)
            for f in names
        }

    before = files()
    builder = ensure_prepared(data_dir)  # already prepared: rewrites nothing
    assert files() == before
    assert builder.info.splits["train"].num_examples == 10000
    assert builder.info.splits["test"].num_examples == 2000
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.features["image"].shape == (28, 28, 1)
    assert str(builder.version) == "1.0.0"
    # The normal TFDS path, by name.
    ds = tfds.load("embedded_fashion_mnist", split="test[:5]", data_dir=data_dir, download=False)
    ex = next(iter(tfds.as_numpy(ds)))
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
    info = dataset_info(_cfg(data_dir=data_dir))
    assert isinstance(info, DatasetInfo)
    assert info.num_classes == 10
    assert info.num_examples == {"train": 10000, "test": 2000}
    assert info.name == "embedded_fashion_mnist"


def test_embedded_file_is_class_balanced():
    for split, per_class in (("train", 1000), ("test", 200)):
        images, labels = embedded.load_embedded_arrays(split)
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10


# ---------------------------------------------------------------------------------------------- train


def test_train_iterator_shapes_dtypes_range(data_dir):
    it = train_iterator(
        _cfg(data_dir=data_dir), image_size=32, global_batch=16, seed=0, process_index=0, process_count=1
    )
    for batch in _take(it, 2):
        assert set(batch) == {"image", "label", "index"}
        assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
        assert batch["index"].shape == (16,) and batch["index"].dtype == np.int64
        assert batch["image"].max() > 128  # not all black
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray -> 3 channels
        assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()


def test_train_iterator_is_deterministic_and_seeded(data_dir):
    cfg = _cfg(data_dir=data_dir, train_split="test")
    kw = dict(image_size=32, global_batch=32, process_index=0, process_count=1)
    a = _take(train_iterator(cfg, seed=3, **kw), 3)
    b = _take(train_iterator(cfg, seed=3, **kw), 3)
    c = _take(train_iterator(cfg, seed=4, **kw), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("streamed", [False, True])
def test_start_step_resumes_exactly_across_epochs(data_dir, monkeypatch, streamed):
    if streamed:  # the path used for datasets too large to hold in memory (e.g. ImageNet)
        monkeypatch.setattr(tfds_format, "IN_MEMORY_MAX_BYTES", 0)
    cfg = _cfg(data_dir=data_dir, train_split="test")  # 2000 examples, 64 per batch: epoch ends in batch 31
    kw = dict(image_size=16, global_batch=64, seed=7, process_index=0, process_count=1)
    full = _take(train_iterator(cfg, **kw), 34)
    for k in (1, 31):
        resumed = _take(train_iterator(cfg, start_step=k, **kw), 34 - k)
        for i, batch in enumerate(resumed):
            np.testing.assert_array_equal(batch["image"], full[k + i]["image"])
            np.testing.assert_array_equal(batch["label"], full[k + i]["label"])


@pytest.mark.parametrize("streamed", [False, True])
def test_one_epoch_is_a_permutation_split_over_processes(data_dir, test_split_hashes, monkeypatch, streamed):
    if streamed:
        monkeypatch.setattr(tfds_format, "IN_MEMORY_MAX_BYTES", 0)
    cfg = _cfg(data_dir=data_dir, train_split="test", **_IDENTITY)
    per_process = []
    for p in range(2):
        # global batch 100 over 2 processes: 50 per process, 1000 examples per process -> 20 batches/epoch.
        it = train_iterator(cfg, image_size=28, global_batch=100, seed=0, process_index=p, process_count=2)
        batches = _take(it, 20)
        assert batches[0]["image"].shape == (50, 28, 28, 3)
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        per_process.append(collections.Counter(zip(_hashes(images), labels.tolist(), strict=True)))
    assert sum(per_process[0].values()) == sum(per_process[1].values()) == 1000
    # Every example exactly once per epoch over the two processes, none shared.
    assert per_process[0] + per_process[1] == test_split_hashes
    assert not (set(per_process[0]) & set(per_process[1]))


@pytest.mark.parametrize("streamed", [False, True])
def test_index_is_the_examples_place_in_the_split(data_dir, monkeypatch, streamed):
    if streamed:
        monkeypatch.setattr(tfds_format, "IN_MEMORY_MAX_BYTES", 0)
    stored = tfds.as_numpy(ensure_prepared(data_dir).as_dataset(split="test", shuffle_files=False))
    stored_hashes = _hashes(np.repeat(np.stack([ex["image"] for ex in stored]), 3, axis=-1))
    cfg = _cfg(data_dir=data_dir, train_split="test", **_IDENTITY)
    for p in range(2):
        it = train_iterator(cfg, image_size=28, global_batch=100, seed=0, process_index=p, process_count=2)
        batch = next(it)
        assert _hashes(batch["image"]) == [stored_hashes[i] for i in batch["index"]]


@pytest.fixture(scope="module")
def numbered_tfds(tmp_path_factory) -> str:
    """A prepared TFDS dataset in 4 shard files whose 160 examples are solid 8x8 PNGs of gray levels
    0-159 with label ``level % 3`` (TFDS stores them in a hashed order); returns its version directory
    (read without builder code)."""
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(160)]
    directory = prepare_numbered_tfds(str(tmp_path_factory.mktemp("numbered")), images, num_shards=4)
    assert len(tfds.builder_from_directory(directory).info.splits["train"].filenames) == 4
    return directory


@pytest.mark.parametrize("streamed", [False, True])
def test_index_follows_stored_order_across_shard_files(numbered_tfds, monkeypatch, streamed):
    """TFDS interleaves 16 shard files unless told not to: the ids must still be each example's place."""
    import io

    import tensorflow as tf

    if streamed:
        monkeypatch.setattr(tfds_format, "IN_MEMORY_MAX_BYTES", 0)
    # The stored order, independently: the shard files one after another, each record as written.
    stored = []
    for shard in sorted(f for f in os.listdir(numbered_tfds) if ".tfrecord-" in f):
        for record in tf.data.TFRecordDataset(os.path.join(numbered_tfds, shard)).as_numpy_iterator():
            png = tf.train.Example.FromString(record).features.feature["image"].bytes_list.value[0]
            stored.append(int(np.asarray(Image.open(io.BytesIO(png)))[0, 0, 0]))
    assert sorted(stored) == list(range(160)) and stored != sorted(stored)
    cfg = _cfg(name=numbered_tfds, data_dir=None, train_split="train", **_IDENTITY)
    seen = []
    for p in range(2):
        it = train_iterator(cfg, image_size=8, global_batch=40, seed=1, process_index=p, process_count=2)
        for batch in _take(it, 4):  # one epoch of this process's 80 examples
            levels = batch["image"][:, 3, 5, 1]
            np.testing.assert_array_equal(levels, [stored[i] for i in batch["index"]])
            np.testing.assert_array_equal(batch["label"], levels % 3)
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(160))


def test_small_images_are_upscaled(data_dir):
    batch = next(
        train_iterator(
            _cfg(data_dir=data_dir, train_split="test", **_IDENTITY),
            image_size=40,
            global_batch=8,
            seed=0,
            process_index=0,
            process_count=1,
        )
    )
    assert batch["image"].shape == (8, 40, 40, 3)


# ----------------------------------------------------------------------------------------------- eval


def test_eval_iterator_covers_split_once_with_padding(data_dir, test_split_hashes):
    batches = list(eval_iterator(_cfg(data_dir=data_dir), "test", image_size=28, batch_size=300))
    assert len(batches) == 7
    for b in batches:
        assert b["image"].shape == (300, 28, 28, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
    last = batches[-1]
    assert last["mask"][:200].all() and not last["mask"][200:].any()
    assert not last["image"][200:].any()
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert collections.Counter(zip(_hashes(images), labels.tolist(), strict=True)) == test_split_hashes
    # Deterministic, and max_examples takes the first examples.
    few = list(eval_iterator(_cfg(data_dir=data_dir), "test", image_size=28, batch_size=8, max_examples=10))
    assert [int(b["mask"].sum()) for b in few] == [8, 2]
    np.testing.assert_array_equal(few[0]["image"], batches[0]["image"][:8])


def test_eval_iterator_resizes_to_image_size(data_dir):
    b = next(eval_iterator(_cfg(data_dir=data_dir), "test", image_size=32, batch_size=4, max_examples=4))
    assert b["image"].shape == (4, 32, 32, 3) and b["mask"].all() and b["image"].dtype == np.uint8


# --------------------------------------------------------------------------------------------- folder


def _make_folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for cname in ("dog", "cat"):  # sorted -> cat=0, dog=1
            d = root / split / cname
            d.mkdir(parents=True)
            for i in range(n):
                ext = (".png", ".jpg", ".JPEG")[i % 3]
                arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{i}{ext}", format="PNG" if ext == ".png" else "JPEG")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "train" / "cat" / "readme.txt").write_text("not an image")
    gray = Image.fromarray(rng.integers(0, 256, (24, 18), dtype=np.uint8))
    gray.save(root / "train" / "dog" / "gray.png")


def test_folder_dataset(tmp_path, capfd):
    _make_folder(tmp_path)
    cfg = _cfg(name="folder", data_dir=str(tmp_path), eval_split="val")
    validate_data_config(cfg)
    info = dataset_info(cfg)
    assert info.num_classes == 2 and info.class_names == ("cat", "dog")
    assert info.num_examples == {"train": 14, "val": 4}  # the corrupt file is counted, .txt is not

    kw = dict(image_size=16, global_batch=4, seed=0, process_index=0, process_count=1)
    a = _take(train_iterator(cfg, **kw), 8)  # > 2 epochs: the corrupt file comes up and is replaced
    _, file_labels, _ = sources.list_folder(cfg, "train")
    for b in a:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8
        assert set(b["label"].tolist()) <= {0, 1}
        np.testing.assert_array_equal(file_labels[b["index"]], b["label"])  # index: place in the file list
    b2 = _take(train_iterator(cfg, **kw), 8)
    for x, y in zip(a, b2, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    resumed = _take(train_iterator(cfg, start_step=5, **kw), 3)
    for x, y in zip(resumed, a[5:], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])

    batches = list(eval_iterator(cfg, "train", image_size=16, batch_size=4))
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert len(labels) == 13  # 14 files, the corrupt one skipped
    assert collections.Counter(labels.tolist()) == {0: 6, 1: 7}
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 4, 1]
    val = list(eval_iterator(cfg, "val", image_size=16, batch_size=8))
    assert len(val) == 1 and int(val[0]["mask"].sum()) == 4
    assert "broken.jpg" in capfd.readouterr().err


def test_folder_processes_are_disjoint(tmp_path):
    _make_folder(tmp_path, per_class=8)
    cfg = _cfg(name="folder", data_dir=str(tmp_path), **_IDENTITY)
    seen = []
    for p in range(2):
        # 17 files -> 8 per process; batch 2 per process -> 4 batches per epoch.
        it = train_iterator(cfg, image_size=8, global_batch=4, seed=0, process_index=p, process_count=2)
        images = np.concatenate([b["image"] for b in _take(it, 4)])
        seen.append(set(_hashes(images)))
    assert not (seen[0] & seen[1])


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(name="no_such_dataset_xyz"), "config.data.name"),
        (dict(name="folder", data_dir=None), "config.data.data_dir"),
        (dict(name="folder", data_dir="/nonexistent/dir/for/test"), "config.data.data_dir"),
        (dict(crop_scale=(0.0, 1.0)), "config.data.crop_scale"),
        (dict(crop_scale=(0.8, 0.5)), "config.data.crop_scale"),
        (dict(crop_scale=(0.2, 1.5)), "config.data.crop_scale"),
        (dict(crop_scale=0.5), "config.data.crop_scale"),
        (dict(crop_ratio=(0.0, 1.0)), "config.data.crop_ratio"),
        (dict(shuffle_buffer=0), "config.data.shuffle_buffer"),
        (dict(prefetch=-1), "config.data.prefetch"),
        (dict(train_split=""), "config.data.train_split"),
        (dict(max_consecutive_unreadable=0), "config.data.max_consecutive_unreadable"),
        (dict(max_unreadable_fraction=1.5), "config.data.max_unreadable_fraction"),
        (dict(stall_timeout_s=0), "config.data.stall_timeout_s"),
        (dict(resize_method="nearest"), "config.data.resize_method"),
        (dict(antialias="yes"), "config.data.antialias"),
        (dict(format="nope"), "config.data.format"),
        (dict(format="prepared", name="nowhere", data_dir="/nonexistent/dir/for/test"), "config.data.name"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_data_config(_cfg(**overrides))


def test_global_batch_not_divisible_by_processes(data_dir):
    with pytest.raises(ConfigError, match="global_batch"):
        train_iterator(
            _cfg(data_dir=data_dir), image_size=32, global_batch=10, seed=0, process_index=0, process_count=3
        )


def test_unknown_eval_split_names_the_field(data_dir):
    with pytest.raises(ConfigError, match=r"config\.data\.eval_split"):
        eval_iterator(_cfg(data_dir=data_dir), "validation", image_size=32, batch_size=4)


def test_dataset_too_small_for_a_batch(data_dir, tmp_path):
    with pytest.raises(DataError, match="embedded_fashion_mnist"):
        train_iterator(
            _cfg(data_dir=data_dir, train_split="test"),
            image_size=32,
            global_batch=4096,
            seed=0,
            process_index=0,
            process_count=1,
        )
    _make_folder(tmp_path, per_class=2)
    with pytest.raises(DataError, match="fewer than one"):
        train_iterator(
            _cfg(name="folder", data_dir=str(tmp_path)),
            image_size=8,
            global_batch=8,
            seed=0,
            process_index=0,
            process_count=1,
        )


def test_unprepared_tfds_dataset_is_a_data_error_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        dataset_info(_cfg(name="cifar10", data_dir=str(tmp_path)))
    assert "cifar10" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="manual") as e:
        train_iterator(
            _cfg(name="imagenet2012", data_dir=str(tmp_path), eval_split="validation"),
            image_size=32,
            global_batch=8,
            seed=0,
            process_index=0,
            process_count=1,
        )
    assert "imagenet2012" in str(e.value)
    assert not any(os.scandir(tmp_path))  # nothing was downloaded or written


def test_prepared_tfds_dataset_without_builder_code_is_read_from_its_directory(data_dir, tmp_path):
    """A dataset prepared elsewhere (e.g. a custom ImageNet-21K) whose builder is not importable: by its
    version directory, or by NAME with data_dir holding NAME/VERSION/."""
    import shutil

    prepared = os.path.join(data_dir, embedded.NAME, str(ensure_prepared(data_dir).version))
    custom = tmp_path / "my_custom_images" / "2.0.1"
    shutil.copytree(prepared, custom)
    for cfg in (_cfg(name=str(custom)), _cfg(name="my_custom_images", data_dir=str(tmp_path))):
        validate_data_config(cfg)
        info = dataset_info(cfg)
        assert info.num_classes == 10 and info.num_examples == {"train": 10000, "test": 2000}
        kw = dict(image_size=16, global_batch=8, seed=0, process_index=0, process_count=1)
        batch = next(train_iterator(cfg, **kw))
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
        reference = next(train_iterator(_cfg(data_dir=data_dir), **kw))
        np.testing.assert_array_equal(batch["image"], reference["image"])  # the same examples, same stream
    with pytest.raises(ConfigError, match=r"config\.data\.name: unknown dataset 'not_prepared_here'"):
        validate_data_config(_cfg(name="not_prepared_here", data_dir=str(tmp_path)))


def test_data_format_picks_a_format_by_name_and_detects_it_by_default(data_dir, tmp_path):
    """``data.format=''`` detects the format from ``data.name`` as the probing always did (a dataset named
    like a format is that format's); a format's name picks it whatever ``data.name`` says."""
    from hybrid_distill_jax.data.formats import format_of

    detected = {
        "embedded_fashion_mnist": "embedded_fashion_mnist",
        "embedded_fashion_mnist:1.0.0": "embedded_fashion_mnist",
        "folder": "folder",
        "cifar10": "tfds",
        os.path.join(data_dir, embedded.NAME, "1.0.0"): "prepared",
    }
    assert {name: format_of(_cfg(name=name)).name for name in detected} == detected
    _make_folder(tmp_path)
    cfg = _cfg(name="my_pets", format="folder", data_dir=str(tmp_path), eval_split="val")
    validate_data_config(cfg)
    assert dataset_info(cfg).class_names == ("cat", "dog")
    # The packaged dataset read as a plain registered TFDS dataset, where it is prepared.
    cfg = _cfg(format="tfds", data_dir=data_dir)
    assert dataset_info(cfg).num_examples == {"train": 10000, "test": 2000}


def test_file_kind_reads_signatures_without_decoding():
    import tensorflow as tf

    from hybrid_distill_jax.data import pipeline

    heads = [b"\xff\xd8\xff\xe0...", b"\x89PNG\r\n\x1a\n...", b"GIF89a", b"BM...", b"hello", b"", b"\xff\xd8"]
    kinds = [int(pipeline._file_kind(tf.constant(h))) for h in heads]
    assert kinds == [0, 1, 2, 3] + [pipeline._NOT_AN_IMAGE] * 3


def test_convex_resizes_of_uint8_need_no_clipping():
    """``_to_uint8(clip=False)`` follows bilinear/area resizes: their rounded output stays in [0, 255]."""
    import tensorflow as tf

    from hybrid_distill_jax.data import pipeline

    rng = np.random.default_rng(0)
    image = tf.constant(rng.choice([0, 255], size=(37, 23, 3)).astype(np.uint8))  # worst case: extremes only
    for method in pipeline._CONVEX_RESIZES:
        for antialias in (False, True):
            for size in ([16, 16], [64, 50]):
                rounded = tf.round(tf.image.resize(image, size, method=method, antialias=antialias)).numpy()
                assert rounded.min() >= 0 and rounded.max() <= 255, (method, antialias, size)
    overshoot = tf.round(tf.image.resize(image, [64, 50], method="bicubic")).numpy()  # negative lobes
    assert overshoot.min() < 0 and overshoot.max() > 255

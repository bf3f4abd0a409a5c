"""Input faults that used to hang or spin: unreadable folders, too many unreadable files, a stalled source;
and what the device receives (uint8 images, no host-only ``index``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hybrid_distill_jax.data import train_iterator
from hybrid_distill_jax.data.pipeline import unreadable_files
from hybrid_distill_jax.errors import DataError
from hybrid_distill_jax.models.build import normalize
from hybrid_distill_jax.train import Trainer
from tests.helpers import REPO, make_teacher, tiny_cli, tiny_cli_env, tiny_distill_config

GARBAGE = b"not an image at all"
TRUNCATED_JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16  # passes the signature check, fails to decode


def _folder(root, good: int, bad: dict[int, bytes], classes=("a", "b")) -> str:
    """``good + len(bad)`` files per split, sorted by name; ``bad`` maps a file number to its bytes."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
        for i in range(good + len(bad)):
            path = root / split / classes[0 if i < (good + len(bad)) // 2 else 1] / f"{i:03d}.jpg"
            if i in bad:
                path.write_bytes(bad[i])
            else:
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(path, format="JPEG")
    return str(root)


def _cfg(root, **overrides):
    return dict(name="folder", data_dir=root, train_split="train", eval_split="test", **overrides)


def _drain(cfg, batches):
    it = train_iterator(cfg, image_size=8, global_batch=4, seed=0, process_index=0, process_count=1)
    return [next(it) for _ in range(batches)]


def test_a_run_of_unreadable_files_longer_than_the_limit_is_a_data_error(tmp_path):
    root = _folder(tmp_path, good=20, bad={i: GARBAGE for i in range(5, 10)})
    cfg = _cfg(root, max_consecutive_unreadable=3, max_unreadable_fraction=1.0)
    with pytest.raises(
        DataError, match=r"consecutive unreadable images.*max_consecutive_unreadable=3.*00[5-9]\.jpg"
    ):
        _drain(cfg, 25)  # > 1 epoch: the run is met
    # Within the limit, the same folder trains: each unreadable file is replaced by the next readable one.
    batches = _drain(_cfg(root, max_consecutive_unreadable=5, max_unreadable_fraction=1.0), 25)
    assert all(b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8 for b in batches)
    assert not {5, 6, 7, 8, 9} & {int(i) for b in batches for i in b["index"]}


def test_too_large_a_fraction_of_unreadable_files_is_a_data_error(tmp_path):
    root = _folder(tmp_path, good=16, bad={3: GARBAGE, 8: TRUNCATED_JPEG, 13: GARBAGE, 18: TRUNCATED_JPEG})
    with pytest.raises(DataError, match=r"3 of its 20 images are unreadable.*max_unreadable_fraction=0\.1"):
        _drain(_cfg(root, max_unreadable_fraction=0.1), 15)
    _drain(_cfg(root, max_unreadable_fraction=0.25), 15)  # 4 of 20 is within 25%


def test_a_source_that_yields_nothing_is_a_data_error_naming_it(tmp_path):
    """Every file passes the cheap signature check and fails to decode: tf.data drops them all and never
    yields a batch; the watchdog ends the wait. In a subprocess: the spinning reader thread dies with it."""
    root = _folder(tmp_path, good=0, bad={i: TRUNCATED_JPEG for i in range(12)})
    code = textwrap.dedent(
        f"""
        import sys
        from hybrid_distill_jax.data import train_iterator
        from hybrid_distill_jax.errors import DataError
        cfg = dict(name="folder", data_dir={root!r}, eval_split="test", stall_timeout_s=3.0,
                   max_consecutive_unreadable=100, max_unreadable_fraction=1.0)
        try:
            next(train_iterator(cfg, image_size=8, global_batch=4, seed=0, process_index=0, process_count=1))
        except DataError as error:
            print(error)
            sys.exit(3)
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    # The message goes to stdout: libjpeg's decoder threads write to stderr and can split its lines.
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no batch arrived in 3 s" in proc.stdout and os.path.join(root, "train") in proc.stdout, (
        proc.stdout
    )


def test_cli_on_a_folder_of_unreadable_images_exits_2_with_one_line(tmp_path):
    root = _folder(tmp_path / "images", good=0, bad={i: GARBAGE for i in range(24)})
    teachers = [make_teacher(tmp_path / name, seed=s) for s, name in enumerate(("deit", "mae"))]
    cmd = tiny_cli(tmp_path / "run", root, teachers) + ["--config.data.name=folder"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=tiny_cli_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unreadable" in errors[0] and ".jpg" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_file_names_that_are_not_utf8_are_read_by_their_bytes(tmp_path):
    """A name the file system holds but UTF-8 cannot decode (b'caf\\xe9.jpg'): os.scandir escapes its bytes,
    which TensorFlow refused (ValueError: ... Unable to convert element to UTF-8). It is read by its bytes;
    an unreadable one is skipped and counted like any other, its name shown with the bytes escaped."""
    root = _folder(tmp_path, good=8, bad={})
    class_a = os.path.join(os.fsencode(root), b"train", b"a")
    with open(os.path.join(class_a, b"caf\xe9.jpg"), "wb") as f:
        f.write((tmp_path / "train" / "a" / "000.jpg").read_bytes())
    with open(os.path.join(class_a, b"\xff\xfe.jpg"), "wb") as f:
        f.write(GARBAGE)
    # Class a sorted: 000-003.jpg, caf\xe9.jpg (position 4), \xff\xfe.jpg (5); class b: 004-007.jpg (6-9).
    seen = {int(i) for batch in _drain(_cfg(root), 6) for i in batch["index"]}
    assert seen == set(range(10)) - {5}
    assert any(name.endswith("/train/a/\\xff\\xfe.jpg") for name in unreadable_files())


def test_device_receives_uint8_images_and_no_index(tmp_path, tfds_dir):
    trainer = Trainer(tiny_distill_config(tmp_path, tfds_dir, steps=2, batch=8), str(tmp_path / "run"))
    cfg = trainer.config
    host = next(train_iterator(cfg.data, image_size=cfg.image_size, global_batch=cfg.batch_size, seed=0))
    assert host["image"].dtype == np.uint8 and "index" in host
    batch = trainer._device_batch(host)
    assert set(batch) == {"image", "label"} and batch["image"].dtype == jnp.uint8
    state, _ = trainer.initial_state()
    stage = trainer.task.stage(0, trainer.total_steps)
    hlo = trainer.step_fn(stage).lower(state, trainer.frozen, batch).as_text()
    assert "x3xui8>" in hlo  # the jitted step's image argument is uint8: conversion happens inside it
    # One conversion for both input kinds: uint8 0..255 and float [0, 1] normalise to the same values.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    from_uint8 = normalize(host["image"], mean, std, 16)
    from_float = normalize(host["image"].astype(np.float32) / 255.0, mean, std, 16)
    assert from_uint8.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(from_uint8), np.asarray(from_float), atol=1e-5)
    by_hand = (host["image"][:, :2, :2].astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    direct = normalize(host["image"][:, :2, :2], mean, std, 2)
    np.testing.assert_allclose(np.asarray(direct), by_hand, atol=1e-5)
    jax.block_until_ready(from_uint8)

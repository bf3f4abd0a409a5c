#!/usr/bin/env python
"""Regenerate the embedded Fashion-MNIST subset shipped with ``hybrid_distill_jax``.

Reads the original Fashion-MNIST IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``), draws a
deterministic, class-balanced subset and writes one compressed ``.npz`` file with uint8 arrays
``train_images [N,28,28]``, ``train_labels [N]``, ``test_images``, ``test_labels``, the ``class_names`` and
the indices of the chosen examples in the original files (``train_source_indices``, ``test_source_indices``).

Example::

    python scripts/make_embedded_data.py --source-dir /usr/share/datasets/fashion-mnist \
        --output hybrid_distill_jax/data/embedded_data/fashion_mnist_subset.npz \
        --train 10000 --test 2000 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys

import numpy as np

from hybrid_distill_jax.data.embedded import CLASS_NAMES

NUM_CLASSES = len(CLASS_NAMES)
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions.
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension.

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "hybrid_distill_jax",
    "data",
    "embedded_data",
    "fashion_mnist_subset.npz",
)


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Parses one gzipped IDX file (big-endian int32 header, then uint8 payload)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: IDX file not found: {path}")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise SystemExit(f"error: {path}: file too short for an IDX header")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise SystemExit(f"error: {path}: IDX magic {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(raw, dtype=np.uint8, offset=header_len)
    if payload.size != int(np.prod(dims)):
        raise SystemExit(f"error: {path}: payload has {payload.size} bytes, header says {dims}")
    return payload.reshape(dims)


def load_split(source_dir: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"), IMAGES_MAGIC)
    labels = _read_idx(os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"), LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise SystemExit(f"error: {prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def balanced_subset(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Returns sorted indices of ``total // NUM_CLASSES`` randomly chosen examples of every class."""
    if total % NUM_CLASSES:
        raise SystemExit(f"error: subset size {total} is not a multiple of {NUM_CLASSES} classes")
    per_class = total // NUM_CLASSES
    chosen = []
    for c in range(NUM_CLASSES):
        candidates = np.flatnonzero(labels == c)
        if candidates.size < per_class:
            raise SystemExit(f"error: class {c} has only {candidates.size} examples, need {per_class}")
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source-dir", default=DEFAULT_SOURCE_DIR, help="folder with the Fashion-MNIST .gz files"
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="path of the .npz file to write")
    parser.add_argument("--train", type=int, default=10000, help="train examples (multiple of 10)")
    parser.add_argument("--test", type=int, default=2000, help="test examples (multiple of 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset selection")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {}
    for split, prefix, count in (("train", "train", args.train), ("test", "t10k", args.test)):
        images, labels = load_split(args.source_dir, prefix)
        idx = balanced_subset(labels, count, rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[idx], dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_source_indices"] = idx.astype(np.int32)
    arrays["class_names"] = np.array(CLASS_NAMES)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    with open(args.output, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {size} bytes, sha256 {digest}")
    for split in ("train", "test"):
        counts = np.bincount(arrays[f"{split}_labels"], minlength=NUM_CLASSES)
        print(f"  {split}: {arrays[f'{split}_images'].shape} per-class counts {counts.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

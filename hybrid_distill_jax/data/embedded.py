"""A TFDS builder for the small Fashion-MNIST subset packaged with this library.

The examples come from ``embedded_data/fashion_mnist_subset.npz`` (see ``embedded_data/ATTRIBUTION.md`` and
``scripts/make_embedded_data.py``); nothing is downloaded. Importing this module registers the builder
``embedded_fashion_mnist`` with TFDS, after which it is read like any other TFDS dataset
(``tfds.builder("embedded_fashion_mnist", data_dir=...)``, ``tfds.load(...)``).
"""

from __future__ import annotations

import fcntl
import io
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from hybrid_distill_jax.errors import DataError

NAME = "embedded_fashion_mnist"
NPZ_FILENAME = "fashion_mnist_subset.npz"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_EXAMPLES = {"train": 10000, "test": 2000}

_CITATION = """\
@article{xiao2017fashionmnist,
  author  = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  title   = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  journal = {arXiv preprint arXiv:1708.07747},
  year    = {2017},
}
"""

_DESCRIPTION = (
    "A deterministic, class-balanced subset of Fashion-MNIST (Zalando Research, MIT licence): 1000 train and "
    "200 test images per class, 28x28 grayscale. Packaged with hybrid_distill_jax so that tests and small "
    "runs work offline."
)


def embedded_npz_path() -> str:
    """Absolute path of the packaged ``.npz`` file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_data", NPZ_FILENAME)


def load_embedded_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 [N,28,28], labels uint8 [N])`` of one split of the packaged file."""
    path = embedded_npz_path()
    if not os.path.isfile(path):
        raise DataError(
            f"embedded dataset file {path} is missing; regenerate it with scripts/make_embedded_data.py"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"embedded dataset file {path} is corrupt or incomplete ({split!r}): {e}") from e
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"embedded dataset file {path}: {split}_images has shape {images.shape} {images.dtype}"
        )
    if labels.shape != (images.shape[0],) or (labels.size and int(labels.max()) >= len(CLASS_NAMES)):
        raise DataError(f"embedded dataset file {path}: {split}_labels does not match {split}_images")
    return images, labels


class EmbeddedFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST subset (10000 train / 2000 test) read from the packaged ``.npz`` file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1000 train / 200 test examples per class."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        images, labels = load_embedded_arrays(split)
        for i in range(images.shape[0]):
            # PNG-encode here (PIL, lossless) rather than letting TFDS run a TF op per example: much faster.
            buf = io.BytesIO()
            PIL.Image.fromarray(images[i]).save(buf, format="PNG")
            yield f"{split}_{i:05d}", {"image": buf.getvalue(), "label": int(labels[i])}


def default_data_dir() -> str:
    """The TFDS data_dir used when none is given (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def ensure_prepared(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepares ``embedded_fashion_mnist`` in ``data_dir`` unless it is already there; returns the builder.

    Cheap when the dataset is already prepared (only the metadata is read).
    """
    data_dir = default_data_dir() if data_dir is None else os.path.expanduser(str(data_dir))
    builder = EmbeddedFashionMnist(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    try:
        # Processes that start together (a multi-process run, parallel test workers) prepare it once:
        # the others wait on the lock, then find it prepared.
        os.makedirs(data_dir, exist_ok=True)
        with open(os.path.join(data_dir, f".{NAME}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            builder = EmbeddedFashionMnist(data_dir=data_dir)
            if not builder.is_prepared():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                        try_download_gcs=False,
                    )
                )
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"could not prepare dataset '{NAME}' in data_dir {data_dir}: {e}") from e
    return EmbeddedFashionMnist(data_dir=data_dir)

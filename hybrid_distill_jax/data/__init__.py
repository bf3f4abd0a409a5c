"""Input pipelines (tf.data / TFDS) and the packaged ``embedded_fashion_mnist`` dataset.

The names below are loaded on first use, so ``data.prefetch`` (device placement, no TensorFlow) can be
imported where TensorFlow is not installed, e.g. by a benchmark on synthetic batches.
"""

import importlib

_HOMES = {
    "EmbeddedFashionMnist": "embedded",
    "ensure_prepared": "embedded",
    "DatasetInfo": "pipeline",
    "dataset_info": "pipeline",
    "eval_iterator": "pipeline",
    "train_iterator": "pipeline",
    "validate_data_config": "pipeline",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"hybrid_distill_jax.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Input pipelines (tf.data / TFDS) and the packaged ``embedded_fashion_mnist`` dataset."""

from hybrid_distill_jax.data.embedded import EmbeddedFashionMnist, ensure_prepared
from hybrid_distill_jax.data.pipeline import (
    DatasetInfo,
    dataset_info,
    eval_iterator,
    train_iterator,
    validate_data_config,
)

__all__ = [
    "DatasetInfo",
    "EmbeddedFashionMnist",
    "dataset_info",
    "ensure_prepared",
    "eval_iterator",
    "train_iterator",
    "validate_data_config",
]

"""The training loop, its step, checkpoints, optimizer and metric logging."""

from hybrid_distill_jax.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]

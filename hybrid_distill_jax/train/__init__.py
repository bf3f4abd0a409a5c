"""The training loop, its step, checkpoints and metric logging (the optimizer: ``hybrid_distill_jax.optim``).

``Trainer``, ``TrainResult`` and ``train`` are loaded on first use, so importing ``train.step`` or
``train.program`` (what a benchmark or the AOT compile needs) does not import the input pipeline and
TensorFlow.
"""

import importlib

__all__ = ["TrainResult", "Trainer", "train"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("hybrid_distill_jax.train.trainer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

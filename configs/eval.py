"""Frozen-feature evaluation of any exported or converted model: k-NN + linear probe + attention diagnostics.

    python -m hybrid_distill_jax.main --config configs/eval.py --workdir runs/eval_hybrid \\
        --config.model_dir=runs/demo/hybrid_student/export

Defaults: the embedded Fashion-MNIST subset at the model's own resolution. For a TFDS dataset, e.g.
ImageNet: ``--config configs/eval.py:imagenet2012 --config.data.data_dir=$TFDS_DATA_DIR``. Protocols:
weighted k-NN (cosine, k=20, temperature 0.07) and MAE's linear probe (BatchNorm without affine +
linear, SGD, warmup + cosine) on ``eval.pool`` features ('cls' or 'gap'). Writes WORKDIR/eval.json and,
with ``eval.diagnostics`` (default on), WORKDIR/diagnostics.json + attention_distance.png + nmi.png.
``model_dir`` also takes a hub name, e.g. ``--config.model_dir=hf-hub:timm/vit_base_patch16_224.dino``
(``python -m hybrid_distill_jax.teachers list``; resolved and converted once: docs/CONVERT.md).
"""

from hybrid_distill_jax.config_lib import base_config


def get_config(arg=None):
    """``arg``: a TFDS dataset name (default: the embedded Fashion-MNIST subset)."""
    c = base_config("evaluate")
    c.name = "evaluate"
    c.model_dir = ""
    if arg and arg != "embedded_fashion_mnist":
        c.data.name = arg
        c.eval.linear_epochs = 90  # MAE's probe length on ImageNet
    else:
        c.data.name = "embedded_fashion_mnist"
        c.data.train_split, c.data.eval_split = "train", "test"
        c.eval.max_train = 10_000
        c.eval.batch_size = 500
        c.eval.diagnostics_examples = 500
    return c

"""Full fine-tuning (MAE protocol) of an exported/converted model, or of a ViT from scratch.

    python -m hybrid_distill_jax.main --config configs/finetune.py --workdir runs/ft_hybrid \\
        --config.init_from=runs/demo/hybrid_student/export

``configs/finetune.py`` alone is sized for the embedded Fashion-MNIST subset at 24 px (a few hundred steps
on a CPU). ``configs/finetune.py:imagenet`` is MAE's ViT-B recipe on ImageNet-1K: 100 epochs, batch 1024,
blr 5e-4 (lr = blr * batch / 256), AdamW (0.9, 0.999), wd 0.05, layer decay 0.65, drop path 0.1, mixup
0.8, cutmix 1.0, label smoothing 0.1, global average pooling, 5 warmup epochs. Without ``init_from`` the
``model`` fields describe a fresh ViT (from scratch). Writes WORKDIR/eval.json with ``finetune_top1``.
``init_from`` also takes a hub name, e.g. ``--config.init_from=hf-hub:timm/vit_base_patch16_224.mae``
(resolved, converted once and cached: docs/CONVERT.md).
"""

from hybrid_distill_jax.config_lib import base_config


def get_config(arg=None):
    c = base_config("finetune")
    c.name = "finetune"
    c.init_from = ""
    if arg == "imagenet":
        c.image_size = 224
        c.model.variant = "B/16"
        c.model.drop_path = 0.1
        c.data.name = "imagenet2012"
        c.data.crop_scale = (0.08, 1.0)
        return c
    c.image_size = 24
    c.batch_size = 128
    c.total_steps = 300
    c.model.variant = "nano/4"
    c.model.drop_path = 0.1
    c.data.name = "embedded_fashion_mnist"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.crop_scale = (0.6, 1.0)
    c.data.shuffle_buffer = 10_000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.optim.min_lr = 2e-5
    c.finetune.layer_decay = 0.75
    c.finetune.mixup = 0.2  # mild: a 4-block ViT on 24 px images underfits with MAE's strong mixing
    c.finetune.cutmix = 0.0
    c.log_every = 50
    c.checkpoint_every = 0
    c.eval.batch_size = 500
    return c

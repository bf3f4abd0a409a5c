"""Hybrid Distill ViT-B/16 from DeiT-B/16 (feature teacher) + MAE-B/16 (relation teacher), ImageNet-1K.

Expected: 83.7% top-1 after ImageNet-1K fine-tuning of the distilled ViT-B with MAE's protocol
(``configs/finetune.py:imagenet``); the paper's number for this teacher pair.

1. Teachers are resolved by name by default (``python -m hybrid_distill_jax.convert list``):
   ``hf-hub:timm/deit_base_patch16_224.fb_in1k`` (feature) and
   ``hf-hub:timm/vit_base_patch16_224.mae`` (relation) are fetched with huggingface_hub (its cache under
   HF_HOME; HF_HUB_OFFLINE=1 forbids the network), converted once and cached (docs/CONVERT.md). On
   hosts without network, fetch them first where there is:
   ``hf download timm/NAME config.json model.safetensors``.
   Local directories converted from the original releases still work:

    python -m hybrid_distill_jax.convert import --family deit \\
        --input deit_base_patch16_224-b5f2ef4d.pth --output teachers/deit_b16
    python -m hybrid_distill_jax.convert import --family mae \\
        --input mae_pretrain_vit_base.pth --output teachers/mae_b16

2. Distill:

    python -m hybrid_distill_jax.main --config configs/hd_vitb16_deit_mae.py \\
        --workdir runs/hd_vitb16_deit_mae --config.data.data_dir=$TFDS_DATA_DIR
    # local teachers: --config configs/hd_vitb16_deit_mae.py:teachers/deit_b16,teachers/mae_b16
    # or: --config.teachers.feature.checkpoint=DIR --config.teachers.relation.checkpoint=DIR

The student is exported to WORKDIR/export; `python -m hybrid_distill_jax.convert export --input
runs/hd_vitb16_deit_mae/export --output hd_vitb16.safetensors` turns it into a timm state dict for
fine-tuning with timm/DeiT code.
"""

from hybrid_distill_jax.config_lib import base_config
from hybrid_distill_jax.convert import hub

FEATURE, RELATION = (hub.teacher("hd_vitb16_deit_mae", role) for role in ("feature", "relation"))


def get_config(arg=None):
    """``arg``: optional 'FEATURE,RELATION' (converted teacher directories or hf-hub: names)."""
    feature, relation = (arg.split(",") + [RELATION])[:2] if arg else (FEATURE, RELATION)
    c = base_config("distill")
    c.name = "hd_vitb16_deit_mae"
    c.image_size = 224
    c.student.variant = "B/16"
    c.student.drop_path = 0.1
    c.student.dtype = "bfloat16"  # compute in bf16; parameters, softmax and losses stay fp32
    c.teachers.feature.checkpoint = feature  # DeiT-B/16, 224 px, 14x14 grid
    c.teachers.relation.checkpoint = relation  # MAE-B/16, 224 px, 14x14 grid, 12 heads like the student
    c.total_epochs = 300.0
    c.batch_size = 2048
    c.optim.warmup_epochs = 20.0
    return c

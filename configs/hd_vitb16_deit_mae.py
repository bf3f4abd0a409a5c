"""Hybrid Distill ViT-B/16 from DeiT-B/16 (feature teacher) + MAE-B/16 (relation teacher), ImageNet-1K.

Expected: 83.7% top-1 after ImageNet-1K fine-tuning of the distilled ViT-B (the paper's number for this
teacher pair; the fine-tuning recipe itself is not part of this repository).

1. Convert the teachers (local files; download them yourself, nothing is fetched):

    python -m hybrid_distill_jax.convert import --family deit \\
        --input deit_base_patch16_224-b5f2ef4d.pth --output teachers/deit_b16
    python -m hybrid_distill_jax.convert import --family mae \\
        --input mae_pretrain_vit_base.pth --output teachers/mae_b16

2. Distill (teacher directories from step 1, as 'FEATURE_DIR,RELATION_DIR' or the defaults above):

    python -m hybrid_distill_jax.main \\
        --config configs/hd_vitb16_deit_mae.py:teachers/deit_b16,teachers/mae_b16 \\
        --workdir runs/hd_vitb16_deit_mae --config.data.data_dir=$TFDS_DATA_DIR
    # or: --config configs/hd_vitb16_deit_mae.py --config.teachers.feature.checkpoint=DIR \\
    #         --config.teachers.relation.checkpoint=DIR

The student is exported to WORKDIR/export; `python -m hybrid_distill_jax.convert export --input
runs/hd_vitb16_deit_mae/export --output hd_vitb16.safetensors` turns it into a timm state dict for
fine-tuning with timm/DeiT code.
"""

from hybrid_distill_jax.config_lib import base_config

FEATURE, RELATION = "teachers/deit_b16", "teachers/mae_b16"


def get_config(arg=None):
    """``arg``: optional 'FEATURE_DIR,RELATION_DIR' (converted teacher directories)."""
    feature, relation = (arg.split(",") + [RELATION])[:2] if arg else (FEATURE, RELATION)
    c = base_config("distill")
    c.name = "hd_vitb16_deit_mae"
    c.image_size = 224
    c.student.variant = "B/16"
    c.student.drop_path = 0.1
    c.teachers.feature.checkpoint = feature  # DeiT-B/16, 224 px, 14x14 grid
    c.teachers.relation.checkpoint = relation  # MAE-B/16, 224 px, 14x14 grid, 12 heads like the student
    c.total_epochs = 300.0
    c.batch_size = 2048
    c.optim.warmup_epochs = 20.0
    return c

"""Hybrid Distill ViT-B/16 from CLIP ViT-B/16 (feature teacher) + MAE-B/16 (relation teacher), ImageNet-1K.

Expected: the Hybrid Distill paper (in the parts we have) reports no ImageNet-1K fine-tuning number for
this teacher pair. For reference, methods distilling from the same CLIP-B/16 teacher report: FD 84.9,
MaskAlign 85.4, dBOT 85.7 (top-1 after fine-tuning a ViT-B/16).

1. Convert the teachers (local files; download them yourself, nothing is fetched):

    python -m hybrid_distill_jax.convert import --family clip \\
        --input ViT-B-16.pt --output teachers/clip_b16          # OpenAI's TorchScript archive
    python -m hybrid_distill_jax.convert import --family mae \\
        --input mae_pretrain_vit_base.pth --output teachers/mae_b16

2. Distill (teacher directories from step 1, as 'FEATURE_DIR,RELATION_DIR' or the defaults above):

    python -m hybrid_distill_jax.main \\
        --config configs/hd_vitb16_clip_mae.py:teachers/clip_b16,teachers/mae_b16 \\
        --workdir runs/hd_vitb16_clip_mae --config.data.data_dir=$TFDS_DATA_DIR
    # or: --config configs/hd_vitb16_clip_mae.py --config.teachers.feature.checkpoint=DIR \\
    #         --config.teachers.relation.checkpoint=DIR

The CLIP teacher sees its own normalisation (CLIP mean/std, recorded in its model.json); the student
keeps ImageNet's.
"""

from hybrid_distill_jax.config_lib import base_config

FEATURE, RELATION = "teachers/clip_b16", "teachers/mae_b16"


def get_config(arg=None):
    """``arg``: optional 'FEATURE_DIR,RELATION_DIR' (converted teacher directories)."""
    feature, relation = (arg.split(",") + [RELATION])[:2] if arg else (FEATURE, RELATION)
    c = base_config("distill")
    c.name = "hd_vitb16_clip_mae"
    c.image_size = 224
    c.student.variant = "B/16"
    c.student.drop_path = 0.1
    c.teachers.feature.checkpoint = feature  # CLIP ViT-B/16, 224 px, 14x14 grid
    c.teachers.relation.checkpoint = relation  # MAE-B/16, 224 px, 14x14 grid, 12 heads like the student
    c.total_epochs = 300.0
    c.batch_size = 2048
    c.optim.warmup_epochs = 20.0
    return c

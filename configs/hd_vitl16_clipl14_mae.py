"""Hybrid Distill ViT-L/16 from CLIP ViT-L/14 (feature teacher) + MAE-L/16 (relation teacher), ImageNet-1K.

Expected: 87.6% top-1 after ImageNet-1K fine-tuning of the distilled ViT-L (the paper's number for this
teacher pair; the fine-tuning recipe itself is not part of this repository).

The CLIP-L/14 teacher runs at 196 px so that its 14x14 patch grid matches the /16 student's at 224 px
(``teachers.feature.image_size=196``). Converting with ``--image-size 196`` resamples its position
embedding once, at conversion time (otherwise it is resampled on the fly, with the same result).

1. Convert the teachers (local files; download them yourself, nothing is fetched):

    python -m hybrid_distill_jax.convert import --family clip \\
        --input ViT-L-14.pt --output teachers/clip_l14_196 --image-size 196
    python -m hybrid_distill_jax.convert import --family mae \\
        --input mae_pretrain_vit_large.pth --output teachers/mae_l16

2. Distill (teacher directories from step 1, as 'FEATURE_DIR,RELATION_DIR' or the defaults above):

    python -m hybrid_distill_jax.main \\
        --config configs/hd_vitl16_clipl14_mae.py:teachers/clip_l14_196,teachers/mae_l16 \\
        --workdir runs/hd_vitl16_clipl14_mae --config.data.data_dir=$TFDS_DATA_DIR
    # or: --config configs/hd_vitl16_clipl14_mae.py --config.teachers.feature.checkpoint=DIR \\
    #         --config.teachers.relation.checkpoint=DIR
"""

from hybrid_distill_jax.config_lib import base_config

FEATURE, RELATION = "teachers/clip_l14_196", "teachers/mae_l16"


def get_config(arg=None):
    """``arg``: optional 'FEATURE_DIR,RELATION_DIR' (converted teacher directories)."""
    feature, relation = (arg.split(",") + [RELATION])[:2] if arg else (FEATURE, RELATION)
    c = base_config("distill")
    c.name = "hd_vitl16_clipl14_mae"
    c.image_size = 224
    c.student.variant = "L/16"
    c.student.drop_path = 0.2
    c.student.remat = True
    c.teachers.feature.checkpoint = feature  # CLIP ViT-L/14
    c.teachers.feature.image_size = 196  # 196 / 14 = 14x14 patches, the student's grid at 224 / 16
    c.teachers.relation.checkpoint = relation  # MAE-L/16, 224 px, 16 heads like the student
    c.total_epochs = 300.0
    c.batch_size = 2048
    c.optim.warmup_epochs = 20.0
    return c

"""Hybrid Distill ViT-L/16 from CLIP ViT-L/14 (features) + MAE-L/16 (relations), ImageNet-1K.

Expected: 87.6% top-1 after ImageNet-1K fine-tuning of the distilled ViT-L (the paper's number for this
teacher pair; the fine-tuning recipe itself is not part of this repository).

The CLIP-L/14 teacher runs at 196 px so that its 14x14 patch grid matches the /16 student's at 224 px
(``teachers.clip.image_size=196``). Converting with ``--image-size 196`` resamples its position
embedding once, at conversion time (otherwise it is resampled on the fly, with the same result).

1. Teachers are resolved by name by default (``python -m hybrid_distill_jax.teachers list``):
   ``hf-hub:timm/vit_large_patch14_clip_224.openai`` (``teachers.clip``) and
   ``hf-hub:timm/vit_large_patch16_224.mae`` (``teachers.mae``) are fetched with huggingface_hub (its
   cache under HF_HOME; HF_HUB_OFFLINE=1 forbids the network), converted once and cached (docs/CONVERT.md). On
   hosts without network, fetch them first where there is:
   ``hf download timm/NAME config.json model.safetensors``.
   Local directories converted from the original releases still work:

    python -m hybrid_distill_jax.teachers import --family clip \\
        --input ViT-L-14.pt --output teachers/clip_l14_196 --image-size 196
    python -m hybrid_distill_jax.teachers import --family mae \\
        --input mae_pretrain_vit_large.pth --output teachers/mae_l16

2. Distill:

    python -m hybrid_distill_jax.main --config configs/hd_vitl16_clipl14_mae.py \\
        --workdir runs/hd_vitl16_clipl14_mae --config.data.data_dir=$TFDS_DATA_DIR
    # local teachers: --config configs/hd_vitl16_clipl14_mae.py:teachers/clip_l14_196,teachers/mae_l16
    # or: --config.teachers.clip.checkpoint=DIR --config.teachers.mae.checkpoint=DIR
"""

from hybrid_distill_jax.recipes import imagenet_distill

# CLIP ViT-L/14 at 196 px (196 / 14 = 14x14 patches, the student's grid at 224 / 16) and MAE-L/16 at
# 224 px, which has the student's 16 heads.
TEACHERS = dict(clip="clip_l14", mae="mae_l16")
CLIP_AT_196 = dict(clip=dict(image_size=196))


def get_config(arg=None):
    """``arg``: optional 'CLIP,MAE' (converted teacher directories or hf-hub: names)."""
    c = imagenet_distill(
        "hd_vitl16_clipl14_mae",
        arg,
        TEACHERS,
        variant="L/16",
        drop_path=0.2,
        feature_teacher="clip",
        teacher_fields=CLIP_AT_196,
    )
    c.student.remat_policy = "full"
    return c

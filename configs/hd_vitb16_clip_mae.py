"""Hybrid Distill ViT-B/16 from CLIP ViT-B/16 (features) + MAE-B/16 (relations), ImageNet-1K.

Expected: the Hybrid Distill paper (in the parts we have) reports no ImageNet-1K fine-tuning number for
this teacher pair. For reference, methods distilling from the same CLIP-B/16 teacher report: FD 84.9,
MaskAlign 85.4, dBOT 85.7 (top-1 after fine-tuning a ViT-B/16).

1. Teachers are resolved by name by default (``python -m hybrid_distill_jax.teachers list``):
   ``hf-hub:timm/vit_base_patch16_clip_224.openai`` (``teachers.clip``) and
   ``hf-hub:timm/vit_base_patch16_224.mae`` (``teachers.mae``) are fetched with huggingface_hub (its
   cache under HF_HOME; HF_HUB_OFFLINE=1 forbids the network), converted once and cached (docs/CONVERT.md). On
   hosts without network, fetch them first where there is:
   ``hf download timm/NAME config.json model.safetensors``.
   Local directories converted from the original releases still work:

    python -m hybrid_distill_jax.teachers import --family clip \\
        --input ViT-B-16.pt --output teachers/clip_b16
    python -m hybrid_distill_jax.teachers import --family mae \\
        --input mae_pretrain_vit_base.pth --output teachers/mae_b16

2. Distill:

    python -m hybrid_distill_jax.main --config configs/hd_vitb16_clip_mae.py \\
        --workdir runs/hd_vitb16_clip_mae --config.data.data_dir=$TFDS_DATA_DIR
    # local teachers: --config configs/hd_vitb16_clip_mae.py:teachers/clip_b16,teachers/mae_b16
    # or: --config.teachers.clip.checkpoint=DIR --config.teachers.mae.checkpoint=DIR

The CLIP teacher sees its own normalisation (CLIP mean/std, recorded in its model.json); the student
keeps ImageNet's.
"""

from hybrid_distill_jax.recipes import imagenet_distill

# CLIP ViT-B/16 and MAE-B/16 at 224 px: 14x14 grids like the student's; MAE has the student's 12 heads.
TEACHERS = dict(clip="clip_b16", mae="mae_b16")


def get_config(arg=None):
    """``arg``: optional 'CLIP,MAE' (converted teacher directories or hf-hub: names)."""
    return imagenet_distill(
        "hd_vitb16_clip_mae", arg, TEACHERS, variant="B/16", drop_path=0.1, feature_teacher="clip"
    )

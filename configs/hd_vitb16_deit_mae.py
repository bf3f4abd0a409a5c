"""Hybrid Distill ViT-B/16 from DeiT-B/16 (features) + MAE-B/16 (relations), ImageNet-1K.

Expected: 83.7% top-1 after ImageNet-1K fine-tuning of the distilled ViT-B with MAE's protocol
(``configs/finetune.py:imagenet``); the paper's number for this teacher pair.

1. Teachers are resolved by name by default (``python -m hybrid_distill_jax.teachers list``):
   ``hf-hub:timm/deit_base_patch16_224.fb_in1k`` (``teachers.deit``) and
   ``hf-hub:timm/vit_base_patch16_224.mae`` (``teachers.mae``) are fetched with huggingface_hub (its
   cache under HF_HOME; HF_HUB_OFFLINE=1 forbids the network), converted once and cached (docs/CONVERT.md). On
   hosts without network, fetch them first where there is:
   ``hf download timm/NAME config.json model.safetensors``.
   Local directories converted from the original releases still work:

    python -m hybrid_distill_jax.teachers import --family deit \\
        --input deit_base_patch16_224-b5f2ef4d.pth --output teachers/deit_b16
    python -m hybrid_distill_jax.teachers import --family mae \\
        --input mae_pretrain_vit_base.pth --output teachers/mae_b16

2. Distill:

    python -m hybrid_distill_jax.main --config configs/hd_vitb16_deit_mae.py \\
        --workdir runs/hd_vitb16_deit_mae --config.data.data_dir=$TFDS_DATA_DIR
    # local teachers: --config configs/hd_vitb16_deit_mae.py:teachers/deit_b16,teachers/mae_b16
    # or: --config.teachers.deit.checkpoint=DIR --config.teachers.mae.checkpoint=DIR

The objective is base_config's: ``terms.feature`` (DeiT's final tokens, SmoothL1 on whitened targets)
and ``terms.relation`` (MAE's attention at blocks 1-11, KL); patches scored by DeiT (docs/METHOD.md).

The student is exported to WORKDIR/export; `python -m hybrid_distill_jax.teachers export --input
runs/hd_vitb16_deit_mae/export --output hd_vitb16.safetensors` turns it into a timm state dict for
fine-tuning with timm/DeiT code.
"""

from hybrid_distill_jax.recipes import imagenet_distill

# DeiT-B/16 and MAE-B/16 at 224 px: 14x14 grids like the student's; MAE has the student's 12 heads.
TEACHERS = dict(deit="deit_b16", mae="mae_b16")


def get_config(arg=None):
    """``arg``: optional 'DEIT,MAE' (converted teacher directories or hf-hub: names)."""
    return imagenet_distill("hd_vitb16_deit_mae", arg, TEACHERS, variant="B/16", drop_path=0.1)

"""Three teachers, ViT-B/16 student: CLIP-B/16 final tokens, DINO-B/16 block-8 tokens, MAE-B/16 relations.

An example of the multi-teacher form beyond the paper's pair: ``terms.feature`` regresses CLIP's final
tokens (as in ``hd_vitb16_clip_mae``), ``terms.dino_block8`` regresses DINO's hidden tokens after its
block 8 from the student's block 8 (whitened targets, its own linear head), ``terms.relation`` imitates
MAE's attention at blocks 1-11. CLIP's CLS attention scores the patches.

Expected: nothing is measured for this combination (no paper reports it, and it has not been run at
ImageNet scale here); compare it with ``hd_vitb16_clip_mae`` at equal epochs by fine-tuning top-1
(``configs/finetune.py:imagenet``). The third teacher adds DINO's first 8 blocks per image (XLA drops
the other 4 from the step): 198 vs 173 GFLOP per image at the first masking stage (+14%), 144 vs 120 at
the last (+20%), by the task's analytic count. ``python -m hybrid_distill_jax.compile --config
configs/hd3_vitb16_clip_dino_mae.py --target h200`` reports its memory.

1. Teachers by name (``python -m hybrid_distill_jax.teachers list``):
   ``hf-hub:timm/vit_base_patch16_clip_224.openai`` (``teachers.clip``),
   ``hf-hub:timm/vit_base_patch16_224.dino`` (``teachers.dino``) and
   ``hf-hub:timm/vit_base_patch16_224.mae`` (``teachers.mae``), fetched and converted once
   (docs/CONVERT.md); without network, fetch them first: ``hf download timm/NAME config.json
   model.safetensors``.

2. Distill:

    python -m hybrid_distill_jax.main --config configs/hd3_vitb16_clip_dino_mae.py \\
        --workdir runs/hd3_vitb16_clip_dino_mae --config.data.data_dir=$TFDS_DATA_DIR
    # local teachers: --config configs/hd3_vitb16_clip_dino_mae.py:CLIP_DIR,DINO_DIR,MAE_DIR
    # one term off: --config.terms.dino_block8.weight=0 (DINO is then not loaded)
"""

from hybrid_distill_jax.recipes import imagenet_distill
from hybrid_distill_jax.terms import term_config

# Three ViT-B/16 teachers at 224 px: 14x14 grids like the student's; MAE has its 12 heads.
TEACHERS = dict(clip="clip_b16", dino="dino_b16", mae="mae_b16")


def get_config(arg=None):
    """``arg``: optional 'CLIP,DINO,MAE' (converted teacher directories or hf-hub: names)."""
    c = imagenet_distill(
        "hd3_vitb16_clip_dino_mae", arg, TEACHERS, variant="B/16", drop_path=0.1, feature_teacher="clip"
    )
    c.terms.dino_block8 = term_config("tokens", "dino", teacher_block=8, student_block=8)
    return c

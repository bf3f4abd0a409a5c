"""Three 2026 teachers, ViT-B/16 student: DINOv2-reg B/14 final tokens, SigLIP2 B/16's image summary,
MAE-B/16 relations, ImageNet-1K.

The agglomerative form (RADIO, UNIC) on Hybrid Distill's objective: ``terms.feature`` regresses DINOv2
with registers' final patch tokens and CLS (its registers are not targets); ``terms.summary`` maps the
student's CLS through a linear head onto SigLIP2's MAP-head output (cosine); ``terms.siglip_tokens``
regresses SigLIP2's final patch tokens (it has no CLS: patches only); ``terms.relation`` imitates MAE's
attention at blocks 1-11. DINOv2's CLS attention scores the patches.

DINOv2 is a /14 model released at 518 px (a 37x37 grid, 1374 tokens: five times a 224 px pass). It runs
here at 224 px, a 16x16 grid against the student's 14x14, and its patch outputs (tokens, CLS attention)
are resampled bilinearly onto the student's grid (``interpolate_grid``); feeding it 196 px instead
(``--config.teachers.dinov2.image_size=196 --config.teachers.dinov2.interpolate_grid=False``) matches
the grids exactly.

Expected: nothing is measured for this combination (no paper reports it; it has not been run at
ImageNet scale here). Compare it with ``hd_vitb16_clip_mae`` at equal epochs by fine-tuning top-1
(``configs/finetune.py:imagenet``) and k-NN. Its compile report (memory and kernels on one H200 and on a
v5e 4x4 slice) is in docs/SCALING.md:

    python -m hybrid_distill_jax.compile --config configs/hd_vitb16_dinov2_siglip2_mae.py --target h200
    python -m hybrid_distill_jax.compile --config configs/hd_vitb16_dinov2_siglip2_mae.py --target v5e:4x4

1. Teachers by name (``python -m hybrid_distill_jax.teachers list``: licences there; DINOv2 and SigLIP2
   are Apache-2.0): fetched and converted once (docs/CONVERT.md); without network, fetch them first:
   ``hf download timm/NAME config.json model.safetensors``.
2. Distill:

    python -m hybrid_distill_jax.main --config configs/hd_vitb16_dinov2_siglip2_mae.py \\
        --workdir runs/hd_vitb16_dinov2_siglip2_mae --config.data.data_dir=$TFDS_DATA_DIR
    # local teachers: --config configs/hd_vitb16_dinov2_siglip2_mae.py:DINOV2_DIR,SIGLIP2_DIR,MAE_DIR
"""

from hybrid_distill_jax.recipes import imagenet_distill
from hybrid_distill_jax.terms import term_config

TEACHERS = dict(dinov2="dinov2reg_b14", siglip2="siglip2_b16", mae="mae_b16")


def get_config(arg=None):
    """``arg``: optional 'DINOV2,SIGLIP2,MAE' (converted teacher directories or hf-hub: names)."""
    c = imagenet_distill(
        "hd_vitb16_dinov2_siglip2_mae",
        arg,
        TEACHERS,
        variant="B/16",
        drop_path=0.1,
        feature_teacher="dinov2",
        teacher_fields=dict(dinov2=dict(image_size=224, interpolate_grid=True)),
    )
    c.terms.summary = term_config("embedding", "siglip2")
    c.terms.siglip_tokens = term_config("tokens", "siglip2")
    return c

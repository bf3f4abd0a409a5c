"""RADIO-like in everything but the teachers a user brings: a ViT-B/16 student, ImageNet-1K, a dense
teacher, a language-aligned teacher and MAE's attention relations.

What it mirrors: the objective of NVIDIA's RADIO (AM-RADIO, RADIOv2.5; the student EMA of C-RADIOv4):

- every teacher's targets normalised by PHI-S (``target_norm='phi_s'``: centre, rotate by a Hadamard
  matrix times the eigenvectors of the targets' covariance, divide by one scalar; estimated once from the
  first ``phi_s_batches`` batches), on the summaries as on the patch tokens;
- per teacher a summary term (``embedding``: the student's CLS through its own head onto the teacher's
  image summary, cosine) and a feature term (``tokens``: the student's CLS and kept patch tokens through
  their own head onto the teacher's final tokens, 0.9 cosine + 0.1 smooth-L1, RADIO's feature mix);
  every weight 1.0;
- an EMA of the student (``ema.decay=0.9996`` for the whole run, C-RADIOv4's), exported beside the online
  weights (``ema.export='both'``) so that both are evaluated.

What makes it this project's: MAE-B/16's attention relations at student blocks 1-11 (``terms.relation``,
Hybrid Distill's), a Gram term on the dense teacher's final patch tokens (``terms.gram``: their cosine
similarities, DINOv3's Gram loss between models), and progressive redundant token masking scored by the
dense teacher's CLS attention (``masking``: keep 196 / 147 / 98 patches over training).

What differs from RADIO, by design or not yet built: one resolution (224 px; RADIO trains at stochastic
multiple resolutions, and at 224 px only, a student is not expected to hold up at high resolution);
linear heads where RADIO trains MLP adaptors (and C-RADIOv4 attention heads); no shift-equivariant loss,
no FeatSharp upsampling, no balanced (angular) summary loss; B-sized teachers and ImageNet-1K only
(RADIO: g/H-sized teachers, DataComp-scale data); fixed weights, no teacher balancing beyond PHI-S
(``--config.terms.NAME.drop=loss_aware --config.terms.NAME.drop_prob=0.5`` on two or more terms gives
UNIC/DUNE's loss-aware teacher dropping).

Default teachers (``python -m hybrid_distill_jax.teachers list``; DINOv2 and SigLIP2 are Apache-2.0, MAE
CC-BY-NC-4.0): ``dense`` = DINOv2-reg B/14 at 224 px (a 16x16 grid resampled onto the student's 14x14:
``interpolate_grid``), ``language`` = SigLIP2 B/16 (summary: its MAP head's output; no CLS, so its feature
term regresses patches only), ``mae`` = MAE-B/16 (the relations teacher: any ViT whose attention is
read). Bring your own by the recipe's argument, in that order (directories, ``hf-hub:`` names or the
known short names; fewer than three keeps the rest), or by field:

    --config configs/hd_vitb16_agglomerative.py:dinov3_b16,siglip2_so400m14
    --config configs/hd_vitb16_agglomerative.py:teachers/my_dense,teachers/my_clip
    --config.teachers.language.checkpoint=hf-hub:timm/vit_base_patch16_clip_224.openai

The dense and language teachers are fed the 224 px crop with ``interpolate_grid=True``, so a /14 teacher
(or any grid) is resampled onto the student's grid and a /16 one is used as is. PHI-S needs a target width
with a Hadamard matrix here (768, 1024, 1152, 1280, 384, powers of two: all the known teachers'); for
another, ``--config.terms.NAME.target_norm=ema``. A term is removed with ``--config.terms.NAME.weight=0``.

Expected: nothing is measured. It has not been trained at scale here (no ImageNet run, no GPU run of this
step); the published RADIOv2.5-B (81.9 k-NN on ImageNet-1K) was distilled from much larger teachers on far
more data at several resolutions, and this recipe is not expected to match it. Compare it with
``hd_vitb16_dinov2_siglip2_mae`` at equal epochs by fine-tuning top-1 (``configs/finetune.py:imagenet``),
k-NN and linear probes of both the EMA and the online weights. Its compile report (memory, kernels and
what the Gram term and the EMA add, on one H200 and on a v5e 4x4 slice) is in docs/SCALING.md:

    python -m hybrid_distill_jax.compile --config configs/hd_vitb16_agglomerative.py --target h200 \\
        --gpus_per_host 1 --config.batch_size=256
    python -m hybrid_distill_jax.compile --config configs/hd_vitb16_agglomerative.py --target v5e:4x4

Distill (teachers by name are fetched and converted once, docs/CONVERT.md; without network fetch them
first: ``hf download timm/NAME config.json model.safetensors``):

    python -m hybrid_distill_jax.main --config configs/hd_vitb16_agglomerative.py \\
        --workdir runs/hd_vitb16_agglomerative --config.data.data_dir=$TFDS_DATA_DIR
"""

import os

from hybrid_distill_jax.recipes import imagenet_distill
from hybrid_distill_jax.teachers import hub_name
from hybrid_distill_jax.teachers.known import KNOWN
from hybrid_distill_jax.terms import term_config

TEACHERS = dict(dense="dinov2reg_b14", language="siglip2_b16", mae="mae_b16")
RESAMPLED = dict(image_size=224, interpolate_grid=True)  # any grid onto the student's 14x14
FEATURE_MIX = dict(loss="mix", mix_cosine=0.9, mix_smooth_l1=0.1)  # RADIO's feature loss
PHI_S = dict(target_norm="phi_s")
EMA_DECAY = 0.9996  # C-RADIOv4's


def _checkpoint(entry: str) -> str:
    """A known short name (and no directory of that name) as its hub name; anything else unchanged."""
    return hub_name(entry) if entry in KNOWN and not os.path.isdir(entry) else entry


def get_config(arg=None):
    """``arg``: optional 'DENSE,LANGUAGE,MAE' (directories, hf-hub: names or known short names)."""
    arg = ",".join(_checkpoint(entry.strip()) for entry in arg.split(",")) if arg else None
    c = imagenet_distill(
        "hd_vitb16_agglomerative",
        arg,
        TEACHERS,
        variant="B/16",
        drop_path=0.1,
        feature_teacher="dense",
        teacher_fields=dict(dense=RESAMPLED, language=RESAMPLED),
    )
    # terms.relation (MAE's attention, student blocks 1-11) is base_config's; terms.feature is replaced
    c.terms.feature = term_config("tokens", "dense", **FEATURE_MIX, **PHI_S)
    c.terms.dense_summary = term_config("embedding", "dense", loss="cosine", **PHI_S)
    c.terms.summary = term_config("embedding", "language", loss="cosine", **PHI_S)
    c.terms.language_tokens = term_config("tokens", "language", **FEATURE_MIX, **PHI_S)
    c.terms.gram = term_config("gram", "dense")
    c.ema.decay = EMA_DECAY
    c.ema.export = "both"
    return c

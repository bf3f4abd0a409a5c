"""A seconds-long distillation config for subprocess tests; pass teachers and data_dir as overrides:

    python -m hybrid_distill_jax.main --config tests/tiny_config.py --workdir DIR \\
        --config.data.data_dir=D --config.teachers.deit.checkpoint=F \\
        --config.teachers.mae.checkpoint=R

``tests/tiny_config.py:three`` adds a third teacher, ``teachers.dino`` (pass its checkpoint too), whose
block-2 hidden tokens the student's block 1 regresses (``terms.dino_block2``), beside the two-teacher
objective.

``tests/tiny_config.py:modern`` replaces them with three teachers of today's kinds (pass each checkpoint):
``teachers.dinov2`` (registers, LayerScale, a patch-4 grid resampled onto the student's) gives the tokens
(``terms.feature``) and scores the patches; ``teachers.dinov3`` (RoPE, registers) the relations
(``terms.relation``); ``teachers.siglip`` (no CLS, a MAP head) the summary embedding (``terms.summary``)
and patch tokens (``terms.siglip_tokens``).

``tests/tiny_config.py:agglomerative`` turns on the agglomerative features at once, over three teachers of
the tiny architecture (pass each checkpoint: ``teachers.deit``, ``teachers.mae``, ``teachers.dino``):
``terms.feature`` regresses DeiT's tokens by the cosine + SmoothL1 'mix' onto PHI-S-normalised targets,
``terms.summary`` DINO's summary embedding onto PHI-S-normalised targets (both statistics estimated from
the first ``phi_s_batches=2`` batches), ``terms.dino_tokens`` DINO's tokens onto EMA-standardised targets
(momentum annealed to 0.1 over 4 steps), ``terms.gram`` DINO's Gram matrices, ``terms.relation`` MAE's
attention relations; ``feature``, ``summary`` and ``dino_tokens`` drop loss-aware in one ``drop_group``.
The student's EMA (``ema.decay``) is exported with the online weights (``ema.export='both'``).
"""

import ml_collections

from hybrid_distill_jax.config_lib import base_config
from hybrid_distill_jax.teachers import teacher_config
from hybrid_distill_jax.terms import term_config


def get_config(arg=None):
    c = base_config("distill")
    c.name = "tiny"
    c.image_size = 32
    c.batch_size = 8
    c.total_steps = 12
    c.data.name = "embedded_fashion_mnist"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.shuffle_buffer = 256
    c.student.variant = "pico/8"
    c.student.drop_path = 0.1  # exercises the dropout RNG across a resume
    c.teachers.deit.dtype = "float32"
    c.teachers.mae.dtype = "float32"
    if arg == "three":
        c.name = "tiny_three"
        c.teachers.dino = teacher_config(dtype="float32")
        c.terms.dino_block2 = term_config("tokens", "dino", teacher_block=2, student_block=1, weight=0.5)
    if arg == "modern":
        c.name = "tiny_modern"
        c.teachers = ml_collections.ConfigDict(
            {
                name: teacher_config(dtype="float32", interpolate_grid=name == "dinov2")
                for name in ("dinov2", "dinov3", "siglip")
            }
        )
        c.terms = ml_collections.ConfigDict(
            dict(
                feature=term_config("tokens", "dinov2"),
                relation=term_config("relations", "dinov3"),
                summary=term_config("embedding", "siglip"),
                siglip_tokens=term_config("tokens", "siglip"),
            )
        )
        c.masking.score_teacher = "dinov2"
    if arg == "agglomerative":
        c.name = "tiny_agglomerative"
        c.teachers.dino = teacher_config(dtype="float32")
        phi_s = dict(target_norm="phi_s", phi_s_batches=2)
        dropped = dict(drop="loss_aware", drop_prob=0.5, drop_group="agglomerative")
        c.terms = ml_collections.ConfigDict(
            dict(
                feature=term_config("tokens", "deit", loss="mix", **phi_s, **dropped),
                summary=term_config("embedding", "dino", **phi_s, **dropped),
                dino_tokens=term_config(
                    "tokens", "dino", target_norm="ema", ema_momentum=0.1, ema_anneal_steps=4, **dropped
                ),
                gram=term_config("gram", "dino", weight=10.0),  # its values are ~0.02
                relation=term_config("relations", "mae"),
            )
        )
        c.ema.update(dict(decay=0.9, warmup_steps=2, export="both"))
    c.masking.stage_starts = (0.0, 0.5)
    c.masking.stage_ratios = (0.25, 0.5)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 2
    c.tensorboard = False
    c.eval.at_end = False
    return c

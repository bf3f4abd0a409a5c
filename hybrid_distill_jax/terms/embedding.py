"""Summary-embedding distillation (RADIO/UNIC-style): the student's CLS token through a linear head onto
the teacher's image summary (``summary``): its projected CLS (CLIP's ``embedding``), its MAP head's output
(SigLIP), or else its pooled token (the final CLS)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_distill_jax import checks, losses
from hybrid_distill_jax.terms import target_norm
from hybrid_distill_jax.terms.base import Term, TermInputs, register
from hybrid_distill_jax.terms.tokens import (
    MIX_FIELDS,
    MIX_RANGES,
    check_phi_s_width,
    linear_head,
    mix_weights,
)


@register
class EmbeddingTerm(target_norm.NormalizedTargets, Term):
    """Cosine (default), MSE, SmoothL1 or their 'mix' between head(student CLS) and the teacher's summary,
    normalised by ``target_norm`` (default 'none'; its statistics are over the batch's summaries)."""

    kind = "embedding"
    defaults = dict(
        loss="cosine",
        smooth_l1_beta=2.0,
        **MIX_FIELDS,
        target_norm="none",
        **target_norm.FIELDS,
        head="linear",
    )
    choices = dict(
        loss=losses.FEATURE_LOSSES, target_norm=target_norm.TARGET_NORMS, head=("linear", "identity")
    )
    ranges = dict(smooth_l1_beta=checks.POSITIVE, **MIX_RANGES, **target_norm.RANGES)
    needs_grid = False  # one vector per image: the teacher may see any patch grid

    @classmethod
    def check_archs(cls, name, cfg, student, teacher):
        width = teacher.get("proj_dim") or teacher["width"]
        checks.require(
            teacher.get("class_token", True) or teacher.get("pool") == "map" or teacher.get("proj_dim"),
            f"terms.{name}: teacher {cfg.teacher!r} has neither a CLS token nor a MAP head to summarise an "
            "image by",
        )
        checks.require(
            cfg.head == "linear" or student["width"] == width,
            f"terms.{name}.head='identity' needs the student's width {student['width']} to equal the "
            f"teacher's embedding width {width}: use head='linear'",
        )
        check_phi_s_width(name, cfg, width)

    def __init__(self, name, cfg, student, teacher):
        super().__init__(name, cfg, student, teacher)
        self.width = self.target_width = teacher.model.proj_dim or teacher.model.width
        self.head = linear_head(name, student, self.width) if cfg.head == "linear" else None

    def init_params(self, rng):
        if self.head is None:
            return None
        return self.head.init(rng, jnp.zeros((1, self.student.width)))["params"]

    def raw_target(self, teacher_out, patches):
        """The teacher's summary, [B, C] (one per image: ``patches`` plays no part)."""
        return teacher_out["summary"]

    def kept_patches(self, inputs: TermInputs) -> None:
        return None

    def value(self, params, inputs: TermInputs, per_sample: bool = False) -> jax.Array:
        target = self.target(inputs)
        pred = inputs.student["tokens"][:, 0]
        if self.head is not None:
            pred = self.head.apply({"params": params}, pred)
        cfg = self.cfg
        return losses.feature_loss(pred, target, cfg.loss, cfg.smooth_l1_beta, mix_weights(cfg), per_sample)

    def flops_per_example(self, patches_per_block):
        return {} if self.head is None else {"student_fwd_bwd": 3 * 2.0 * self.student.width * self.width}

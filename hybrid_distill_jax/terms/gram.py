"""Gram relations (DINOv3's Gram loss, between models): the cosine similarities among the student's kept
patch tokens imitate the teacher's among the same patches, by MSE.

A relation that needs no attention map and no projection head (a K x K matrix has no width): any teacher
qualifies, a MAP-head or rotary one included, and both models stay on the fused attention path. Only
the kept patches' [B, K, K] matrices are formed."""

from __future__ import annotations

import jax

from hybrid_distill_jax import losses
from hybrid_distill_jax.models.vit import gather_tokens
from hybrid_distill_jax.terms.base import TermInputs, register
from hybrid_distill_jax.terms.tokens import BLOCK_FIELDS, BLOCK_RANGES, BlockTokensTerm, tokens_at


@register
class GramTerm(BlockTokensTerm):
    """MSE between the cosine-similarity matrices of the kept patches: the student's tokens after block
    ``student_block`` and the teacher's after ``teacher_block`` (0: each model's final, normed tokens).
    Prefix tokens (CLS, registers) take no part."""

    kind = "gram"
    defaults = dict(BLOCK_FIELDS)
    ranges = dict(BLOCK_RANGES)

    def value(self, params, inputs: TermInputs, per_sample: bool = False) -> jax.Array:
        cfg = self.cfg
        block = cfg.student_block or self.student.depth
        student = tokens_at(inputs.student, cfg.student_block)[:, self.student.num_prefix :]
        teacher = tokens_at(inputs.teacher, cfg.teacher_block)[:, self.teacher.model.num_prefix :]
        return losses.gram_loss(student, gather_tokens(teacher, inputs.kept.patches_at(block)), per_sample)

    def flops_per_example(self, patches_per_block):
        """The two K x K products (the student's forward and backward: 3x)."""
        k = patches_per_block[(self.cfg.student_block or self.student.depth) - 1]
        return {"student_fwd_bwd": 2.0 * k * k * (3 * self.student.width + self.teacher.model.width)}

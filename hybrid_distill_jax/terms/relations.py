"""Attention-relation distillation (the diversity half of Hybrid Distill): the student's attention
distributions at chosen blocks imitate the teacher's over the same tokens, by KL or MSE.

A teacher qualifies when its blocks' attention is a plain softmax over its tokens and it has a CLS token:
DeiT, MAE, DINO, DINOv2 (registers are left out of the map), CLIP and DINOv3 (rotary embeddings rotate the
queries and keys; the map is still a softmax of their products, taken after the rotation) qualify;
SigLIP has no CLS token (its MAP head pools with one learned query, not a relation between tokens) and is
refused, as is a teacher whose patch grid is interpolated asked to run on the student's kept tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_distill_jax import checks, losses
from hybrid_distill_jax.models.vit import forward_flops
from hybrid_distill_jax.terms.base import Term, TermInputs, register


def relation_layers(cfg, student_depth: int) -> tuple[int, ...]:
    """The student blocks a relations term distils (``layers``; default every block but the last)."""
    return tuple(cfg.layers) if cfg.get("layers") is not None else tuple(range(1, student_depth))


def without_registers(logits: jax.Array, num_prefix: int) -> jax.Array:
    """Attention logits [B, H, N, N] over CLS + patches only: the other prefix tokens' rows and columns
    (registers, a distillation token) removed."""
    if num_prefix == 1:
        return logits
    rows = jnp.concatenate([logits[:, :, :1], logits[:, :, num_prefix:]], axis=2)
    return jnp.concatenate([rows[..., :1], rows[..., num_prefix:]], axis=3)


@register
class RelationTerm(Term):
    """Per distilled block l and head, KL(softmax(teacher logits) || softmax(student logits)) over CLS +
    the patches block l sees. The teacher's logits come from its full-image pass (its queries and keys at
    those tokens: no N x N map), or, with ``teacher_on_kept``, from a pass on the student's own tokens."""

    kind = "relations"
    defaults = dict(layers=None, loss="kl", teacher_on_kept=False)
    choices = dict(loss=losses.RELATION_LOSSES, teacher_on_kept=(False, True))
    ranges = dict(layers=checks.ints(1))

    @classmethod
    def is_active(cls, cfg, student_depth):
        return cfg.weight > 0 and bool(relation_layers(cfg, student_depth))

    @classmethod
    def check_fields(cls, name, cfg, student_depth):
        super().check_fields(name, cfg, student_depth)
        for layer in relation_layers(cfg, student_depth):
            checks.require(
                1 <= layer < student_depth,
                f"terms.{name}.layers: layer {layer} is outside 1..{student_depth - 1} (the student's last "
                f"block, {student_depth}, is not distilled by relations)",
            )

    @classmethod
    def check_archs(cls, name, cfg, student, teacher):
        field = f"terms.{name}"
        for layer in relation_layers(cfg, student["depth"]):
            checks.require(
                layer <= teacher["depth"],
                f"{field}.layers: layer {layer} exceeds the depth {teacher['depth']} of teacher "
                f"{cfg.teacher!r}",
            )
        checks.require(
            teacher.get("class_token", True),
            f"{field}: teacher {cfg.teacher!r} has no CLS token; relations distil the CLS + patch attention "
            "map (a MAP head's pooling is not a token relation)",
        )
        checks.require(
            teacher["num_heads"] == student["num_heads"],
            f"{field}: the teacher {cfg.teacher!r} has {teacher['num_heads']} heads per layer, the student "
            f"{student['num_heads']}; head counts must match on distilled layers",
        )

    def __init__(self, name, cfg, student, teacher):
        super().__init__(name, cfg, student, teacher)
        self.layers = relation_layers(cfg, student.depth)

    def teacher_outputs(self):
        return None if self.cfg.teacher_on_kept else {"qk_layers": self.layers}

    @property
    def reads_final_tokens(self):
        return False

    def student_outputs(self):
        return {"attn_layers": self.layers}

    def targets(self, inputs: TermInputs) -> dict[int, jax.Array]:
        """{layer: the teacher's fp32 logits [B, H, 1+K_l, 1+K_l] over CLS + the patches block l sees}."""
        kept = inputs.kept
        p = self.teacher.model.num_prefix
        if self.cfg.teacher_on_kept:
            # Drops after the last distilled layer change no target: the teacher stops needing tokens there.
            drops = {k: v for k, v in (kept.drop_after or {}).items() if k < max(self.layers)}
            out = inputs.run_teacher(
                keep_indices=kept.input_indices, drop_after=drops, attn_layers=self.layers
            )
            return {layer: without_registers(out["attn_logits"][layer], p) for layer in self.layers}
        cls = jnp.zeros((kept.final_indices.shape[0], 1), jnp.int32)
        return {
            layer: losses.relation_logits(
                *inputs.teacher["qk"][layer], jnp.concatenate([cls, kept.patches_at(layer) + p], axis=1)
            )
            for layer in self.layers
        }

    def value(self, params, inputs: TermInputs, per_sample: bool = False) -> jax.Array:
        targets = self.targets(inputs)
        sp = self.student.num_prefix
        per_layer = [
            losses.relation_loss(
                targets[layer],
                without_registers(inputs.student["attn_logits"][layer], sp),
                self.cfg.loss,
                per_sample,
            )
            for layer in self.layers
        ]
        return jnp.mean(jnp.stack(per_layer), axis=0)

    def flops_per_example(self, patches_per_block):
        if not self.cfg.teacher_on_kept:
            return {}
        t = self.teacher.model
        seen = [patches_per_block[min(i, len(patches_per_block) - 1)] for i in range(t.depth)]
        return {f"{self.cfg.teacher}_teacher_fwd": forward_flops(t, seen, self.teacher.image_size)}

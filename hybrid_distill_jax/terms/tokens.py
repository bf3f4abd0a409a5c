"""Token regression (FD, MaskAlign, the feature half of Hybrid Distill): the student's tokens through a
linear head onto a teacher's normalised tokens, at the patches the student kept."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_distill_jax import checks, losses
from hybrid_distill_jax.models.vit import gather_tokens
from hybrid_distill_jax.terms.base import Term, TermInputs, register

TARGET_NORMS = ("whiten", "standardize", "none")


def normalize_target(x: jax.Array, kind: str) -> jax.Array:
    """'whiten': parameter-free LayerNorm over channels, per token; 'standardize': each channel to zero
    mean and unit variance over the batch's tokens (per-teacher standardisation, as UNIC); 'none'."""
    if kind == "whiten":
        return losses.whiten(x)
    if kind == "standardize":
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=(0, 1), keepdims=True)
        var = jnp.var(x, axis=(0, 1), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6)
    return x


def linear_head(name: str, student, out_width: int) -> nn.Dense:
    """The projection a term trains beside the student, in the student's dtypes."""
    return nn.Dense(out_width, dtype=student.dtype, param_dtype=student.param_dtype, name=name)


@register
class TokenTerm(Term):
    """CLS + kept patch tokens of student block ``student_block`` regressed onto the teacher's at block
    ``teacher_block`` (0: each model's final, normed tokens; l: the hidden state after block l).
    Registers (either side's) are not regressed; a teacher without CLS (SigLIP) gives patch targets only."""

    kind = "tokens"
    defaults = dict(
        teacher_block=0,
        student_block=0,
        loss="smooth_l1",
        smooth_l1_beta=2.0,
        target_norm="whiten",
        head="linear",
    )
    choices = dict(loss=losses.FEATURE_LOSSES, target_norm=TARGET_NORMS, head=("linear", "identity"))
    ranges = dict(
        teacher_block=checks.ints(0, "0: the final tokens"),
        student_block=checks.ints(0, "0: the final tokens"),
        smooth_l1_beta=checks.POSITIVE,
    )

    @classmethod
    def check_archs(cls, name, cfg, student, teacher):
        field = f"terms.{name}"
        for side, arch in (("teacher", teacher), ("student", student)):
            block = cfg[f"{side}_block"]
            checks.require(
                block <= arch["depth"],
                f"{field}.{side}_block={block} exceeds the {side}'s depth {arch['depth']}",
            )
        checks.require(
            cfg.head == "linear" or student["width"] == teacher["width"],
            f"{field}.head='identity' needs equal widths; the student has {student['width']}, "
            f"the teacher {teacher['width']}: use head='linear'",
        )

    def __init__(self, name, cfg, student, teacher):
        super().__init__(name, cfg, student, teacher)
        self.width = teacher.model.width
        self.head = linear_head(name, student, self.width) if cfg.head == "linear" else None

    def teacher_outputs(self):
        return {"hidden_layers": (self.cfg.teacher_block,)} if self.cfg.teacher_block else {}

    @property
    def reads_final_tokens(self):
        return not self.cfg.teacher_block

    def student_outputs(self):
        return {"hidden_layers": (self.cfg.student_block,)} if self.cfg.student_block else {}

    def init_params(self, rng):
        if self.head is None:
            return None
        return self.head.init(rng, jnp.zeros((1, 1, self.student.width)))["params"]

    def value(self, params, inputs: TermInputs) -> jax.Array:
        cfg = self.cfg
        teacher_tokens = (
            inputs.teacher["hidden"][cfg.teacher_block] if cfg.teacher_block else inputs.teacher["tokens"]
        )
        block = cfg.student_block or self.student.depth
        pred = inputs.student["hidden"][block] if cfg.student_block else inputs.student["tokens"]
        teacher, p = self.teacher.model, self.teacher.model.num_prefix
        target = gather_tokens(teacher_tokens[:, p:], inputs.kept.patches_at(block))
        patches_pred = pred[:, self.student.num_prefix :]
        if teacher.class_token:
            target = jnp.concatenate([teacher_tokens[:, :1], target], axis=1)
            pred = jnp.concatenate([pred[:, :1], patches_pred], axis=1)
        else:
            pred = patches_pred
        target = normalize_target(target, cfg.target_norm)
        if self.head is not None:
            pred = self.head.apply({"params": params}, pred)
        return losses.feature_loss(pred, target, cfg.loss, cfg.smooth_l1_beta)

    def flops_per_example(self, patches_per_block):
        if self.head is None:
            return {}
        block = self.cfg.student_block or self.student.depth
        head = 2.0 * (1 + patches_per_block[block - 1]) * self.student.width * self.width
        return {"student_fwd_bwd": 3 * head}

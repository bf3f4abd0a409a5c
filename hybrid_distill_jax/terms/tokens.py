"""Token regression (FD, MaskAlign, the feature half of Hybrid Distill): the student's tokens through a
linear head onto a teacher's normalised tokens, at the patches the student kept."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_distill_jax import checks, losses
from hybrid_distill_jax.models.vit import gather_tokens
from hybrid_distill_jax.terms import target_norm
from hybrid_distill_jax.terms.base import Term, TermInputs, register

# loss='mix': the weights of the cosine and the SmoothL1 parts (``losses.feature_loss``)
MIX_FIELDS = dict(mix_cosine=0.5, mix_smooth_l1=0.5)
MIX_RANGES = dict(mix_cosine=checks.NON_NEGATIVE, mix_smooth_l1=checks.NON_NEGATIVE)


def mix_weights(cfg) -> tuple[float, float]:
    return float(cfg.mix_cosine), float(cfg.mix_smooth_l1)


def tokens_at(out: dict, block: int) -> jax.Array:
    """A model's tokens after block ``block`` (its hidden state; 0: its final, normed tokens)."""
    return out["hidden"][block] if block else out["tokens"]


BLOCK_FIELDS = dict(teacher_block=0, student_block=0)
BLOCK_RANGES = dict(
    teacher_block=checks.ints(0, "0: the final tokens"), student_block=checks.ints(0, "0: the final tokens")
)


class BlockTokensTerm(Term):
    """A term that compares the student's tokens after ``student_block`` with the teacher's after
    ``teacher_block`` (``BLOCK_FIELDS``; 0: each model's final, normed tokens): what it asks of each pass."""

    @classmethod
    def check_archs(cls, name, cfg, student, teacher):
        for side, arch in (("teacher", teacher), ("student", student)):
            block = cfg[f"{side}_block"]
            checks.require(
                block <= arch["depth"],
                f"terms.{name}.{side}_block={block} exceeds the {side}'s depth {arch['depth']}",
            )

    def teacher_outputs(self):
        return {"hidden_layers": (self.cfg.teacher_block,)} if self.cfg.teacher_block else {}

    @property
    def reads_final_tokens(self):
        return not self.cfg.teacher_block

    def student_outputs(self):
        return {"hidden_layers": (self.cfg.student_block,)} if self.cfg.student_block else {}


def linear_head(name: str, student, out_width: int) -> nn.Dense:
    """The projection a term trains beside the student, in the student's dtypes."""
    return nn.Dense(out_width, dtype=student.dtype, param_dtype=student.param_dtype, name=name)


def check_phi_s_width(name: str, cfg, width: int) -> None:
    checks.require(
        cfg.target_norm != "phi_s" or target_norm.hadamard(width) is not None,
        f"terms.{name}.target_norm='phi_s': the teacher's target width {width} has no Hadamard matrix here "
        "(a power of two times 1, 12, 20, 36, ...: docs/METHOD.md, 'PHI-S'); use target_norm='ema' or "
        "'standardize'",
    )


@register
class TokenTerm(target_norm.NormalizedTargets, BlockTokensTerm):
    """CLS + kept patch tokens of student block ``student_block`` regressed onto the teacher's at block
    ``teacher_block`` (0: each model's final, normed tokens; l: the hidden state after block l).
    Registers (either side's) are not regressed; a teacher without CLS (SigLIP) gives patch targets only.
    ``target_norm``'s statistics cover every token the term regresses, CLS included."""

    kind = "tokens"
    defaults = dict(
        **BLOCK_FIELDS,
        loss="smooth_l1",
        smooth_l1_beta=2.0,
        **MIX_FIELDS,
        target_norm="whiten",
        **target_norm.FIELDS,
        head="linear",
    )
    choices = dict(
        loss=losses.FEATURE_LOSSES, target_norm=target_norm.TARGET_NORMS, head=("linear", "identity")
    )
    ranges = dict(**BLOCK_RANGES, smooth_l1_beta=checks.POSITIVE, **MIX_RANGES, **target_norm.RANGES)

    @classmethod
    def check_archs(cls, name, cfg, student, teacher):
        field = f"terms.{name}"
        super().check_archs(name, cfg, student, teacher)
        checks.require(
            cfg.head == "linear" or student["width"] == teacher["width"],
            f"{field}.head='identity' needs equal widths; the student has {student['width']}, "
            f"the teacher {teacher['width']}: use head='linear'",
        )
        check_phi_s_width(name, cfg, teacher["width"])

    def __init__(self, name, cfg, student, teacher):
        super().__init__(name, cfg, student, teacher)
        self.width = self.target_width = teacher.model.width
        self.head = linear_head(name, student, self.width) if cfg.head == "linear" else None

    def init_params(self, rng):
        if self.head is None:
            return None
        return self.head.init(rng, jnp.zeros((1, 1, self.student.width)))["params"]

    def raw_target(self, teacher_out, patches):
        """The teacher's CLS (when it has one) and patch tokens at ``patches`` (None: all)."""
        tokens = tokens_at(teacher_out, self.cfg.teacher_block)
        target = tokens[:, self.teacher.model.num_prefix :]
        if patches is not None:
            target = gather_tokens(target, patches)
        if self.teacher.model.class_token:
            target = jnp.concatenate([tokens[:, :1], target], axis=1)
        return target

    def kept_patches(self, inputs: TermInputs) -> jax.Array:
        return inputs.kept.patches_at(self.cfg.student_block or self.student.depth)

    def value(self, params, inputs: TermInputs, per_sample: bool = False) -> jax.Array:
        cfg = self.cfg
        pred = tokens_at(inputs.student, cfg.student_block)
        patches_pred = pred[:, self.student.num_prefix :]
        if self.teacher.model.class_token:
            pred = jnp.concatenate([pred[:, :1], patches_pred], axis=1)
        else:
            pred = patches_pred
        target = self.target(inputs)
        if self.head is not None:
            pred = self.head.apply({"params": params}, pred)
        return losses.feature_loss(pred, target, cfg.loss, cfg.smooth_l1_beta, mix_weights(cfg), per_sample)

    def flops_per_example(self, patches_per_block):
        if self.head is None:
            return {}
        block = self.cfg.student_block or self.student.depth
        head = 2.0 * (1 + patches_per_block[block - 1]) * self.student.width * self.width
        return {"student_fwd_bwd": 3 * head}

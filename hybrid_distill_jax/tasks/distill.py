"""The Hybrid Distill objective: frozen teachers -> targets -> kept tokens -> student -> loss terms.

``L = alpha * L_feat(T_c -> S) + beta * L_rel(T_m -> S)``. FD-only (beta=0), relation-only (alpha=0),
random masking (``masking.selection='random'``) and no masking (mask ratios 0) are configurations of
this one objective; which patches are kept, and where, is the ``masking.KeepPlan``'s business.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_distill_jax import losses, masking
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.build import FrozenTeacher, normalize, vit_from_config
from hybrid_distill_jax.models.vit import arch_dict, forward_flops, gather_tokens
from hybrid_distill_jax.tasks.base import Task, register

log = logging.getLogger("hybrid_distill_jax")


def relation_layers(loss_cfg, student_depth: int) -> tuple[int, ...]:
    """The student blocks the relation term distils (``loss.relation_layers``; default all but the last)."""
    layers = loss_cfg.get("relation_layers")
    return tuple(layers) if layers is not None else tuple(range(1, student_depth))


def teacher_roles(config, student_depth: int) -> tuple[str, ...]:
    """The teachers the objective loads: for a loss term with a positive weight, or to score patches."""
    lcfg, score_role = config.loss, masking.SCORE_ROLES[config.masking.score_source]
    roles = []
    if lcfg.alpha > 0 or score_role == "feature":
        roles.append("feature")
    if (lcfg.beta > 0 and relation_layers(lcfg, student_depth)) or score_role == "relation":
        roles.append("relation")
    return tuple(roles)


def check_teachers(config, archs: Mapping[str, Mapping[str, Any]]) -> None:
    """Student/teacher compatibility; raises a one-line ConfigError naming the field.

    ``archs``: ``'student'`` and each available teacher role -> its architecture dict (``model.json``'s
    ``arch``, ``models.vit.arch_dict``) with ``image_size`` set to the resolution the model runs at.
    ``config_lib.validate`` calls it with the teachers' ``model.json`` (or the student alone), the task
    with the loaded teachers.
    """
    lcfg, mcfg = config.loss, config.masking
    student = archs["student"]
    depth, grid = student["depth"], student["image_size"] // student["patch_size"]
    if student.get("dist_token"):
        raise ConfigError("student.dist_token=True: the student must have a single CLS prefix token")
    layers = relation_layers(lcfg, depth)
    for layer in layers:
        if not 1 <= layer < depth:
            raise ConfigError(
                f"loss.relation_layers: layer {layer} is outside 1..{depth - 1} (the last block, "
                f"{depth}, belongs to the feature term)"
            )
    plan = masking.keep_plan(mcfg, grid**2, depth)
    for role, arch in archs.items():
        if role == "student":
            continue
        size, patch = arch["image_size"], arch["patch_size"]
        if size % patch:
            raise ConfigError(f"teachers.{role}.image_size={size} is not divisible by its patch size {patch}")
        if size // patch != grid:
            raise ConfigError(
                f"teachers.{role}: patch grid {size // patch}x{size // patch} differs from the student's "
                f"{grid}x{grid} ({size}px / patch {patch}); set teachers.{role}.image_size={grid * patch}"
            )
    relation = archs.get("relation")
    if relation is not None and lcfg.beta > 0 and layers:
        for layer in layers:
            if layer > relation["depth"]:
                raise ConfigError(
                    f"loss.relation_layers: layer {layer} exceeds the relation teacher's depth "
                    f"{relation['depth']}"
                )
        if lcfg.relation_teacher_on_kept and relation.get("dist_token"):
            raise ConfigError(
                "loss.relation_teacher_on_kept=True needs a relation teacher with one prefix (CLS) token"
            )
        if relation["num_heads"] != student["num_heads"]:
            raise ConfigError(
                f"loss.relation_layers: the relation teacher has {relation['num_heads']} heads per layer, "
                f"the student {student['num_heads']}; head counts must match on distilled layers"
            )
    scorer = archs.get(masking.SCORE_ROLES[mcfg.score_source])
    if scorer is not None:
        deepest = max(plan.score_layers(scorer["depth"]))
        if deepest > scorer["depth"]:
            raise ConfigError(
                f"masking.drop_layers: layer {deepest} exceeds the scoring teacher's depth {scorer['depth']}"
            )


@register
class DistillTask(Task):
    """Student (+ linear feature head) trained against a feature teacher and a relation teacher."""

    name = "distill"

    def __init__(self, config, num_classes: int = 0, *, abstract: bool = False, platform: str | None = None):
        super().__init__(config, num_classes, abstract=abstract, platform=platform)
        scfg, lcfg, mcfg = config.student, config.loss, config.masking
        self.student = vit_from_config(scfg, "student", image_size=config.image_size, num_classes=0)
        self.mean, self.std = tuple(scfg.mean), tuple(scfg.std)
        self.alpha, self.beta = float(lcfg.alpha), float(lcfg.beta)
        self.depth = self.student.depth
        self.num_patches = self.student.grid**2
        self.relation_layers = relation_layers(lcfg, self.depth)
        self.teachers = {}
        for role in teacher_roles(config, self.depth):
            self.teachers[role], self.frozen[role] = FrozenTeacher.load(
                config.teachers[role], f"teachers.{role}", abstract=abstract, platform=self.platform
            )
        archs = {
            role: {**arch_dict(t.model), "image_size": t.image_size} for role, t in self.teachers.items()
        }
        for role, t in self.teachers.items():
            log.info("teachers.%s: %s", role, json.dumps(t.source))
        check_teachers(config, {"student": arch_dict(self.student), **archs})
        self.plan = masking.keep_plan(mcfg, self.num_patches, self.depth)
        self.score_role = masking.SCORE_ROLES[mcfg.score_source]
        scorer_depth = self.teachers[self.score_role].model.depth if self.score_role else self.depth
        self.score_layers = self.plan.score_layers(scorer_depth)
        self.feature_width = self.teachers["feature"].model.width if "feature" in self.teachers else 0
        self.head = None
        if self.alpha > 0 and not (lcfg.head == "identity" and self.feature_width == self.student.width):
            self.head = nn.Dense(
                self.feature_width,
                dtype=self.student.dtype,
                param_dtype=self.student.param_dtype,
                name="head",
            )

    # -- task interface ------------------------------------------------------------------------------
    @property
    def vit(self):
        return self.student

    def vit_params(self, params):
        return params["student"]

    def export_metadata(self) -> dict:
        teachers = {role: t.source for role, t in self.teachers.items()}
        return dict(super().export_metadata(), teachers=teachers)

    def init_params(self, rng):
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        params = {"student": self.student.init(rng, x)["params"]}
        if self.head is not None:
            params["head"] = self.head.init(rng, jnp.zeros((1, 1, self.student.width)))["params"]
        return params

    def stage(self, step: int, total_steps: int):
        """The plan's static token counts."""
        return self.plan.stage(step, total_steps)

    def stage_metrics(self, stage) -> dict[str, float]:
        return self.plan.stage_metrics(stage)

    def stages(self, total_steps: int):
        return self.plan.stages(total_steps)

    def flops_per_example(self, stage) -> dict[str, float]:
        """Student forward + backward (3x forward, head included) and each teacher's forward."""
        patches = self.plan.patches_per_block(stage, self.depth)
        student = forward_flops(self.student, patches, self.image_size)
        if self.head is not None:
            student += 2 * (1 + patches[-1]) * self.student.width * self.feature_width
        out = {"student_fwd_bwd": 3 * student}
        on_kept = self.beta > 0 and bool(self.relation_layers) and self.config.loss.relation_teacher_on_kept
        for role, t in self.teachers.items():
            seen = [t.grid**2] * t.model.depth
            if role == "relation" and on_kept:
                seen = [patches[min(i, len(patches) - 1)] for i in range(t.model.depth)]
            out[f"{role}_teacher_fwd"] = forward_flops(t.model, seen, t.image_size)
        out["total"] = sum(out.values())
        return out

    def loss_fn(self, params, frozen, batch, rng, stage):
        lcfg = self.config.loss
        images = batch["image"]
        b = images.shape[0]
        rng_mask, rng_drop = jax.random.split(rng)
        rel_layers = self.relation_layers if self.beta > 0 else ()
        on_kept = bool(rel_layers) and lcfg.relation_teacher_on_kept

        # Teachers on the full image, on fused attention: no N x N map is formed. The relation teacher
        # hands out its distilled blocks' queries and keys; the scoring teacher its CLS attention rows.
        tout = {}
        for role, teacher in self.teachers.items():
            cls_layers = self.score_layers if role == self.score_role else ()
            qk_layers = rel_layers if role == "relation" and not on_kept else ()
            if (role == "feature" and self.alpha > 0) or cls_layers or qk_layers:
                tout[role] = teacher(frozen[role], images, cls_attn_layers=cls_layers, qk_layers=qk_layers)

        scores = {
            layer: masking.redundancy_scores(tout[self.score_role]["cls_attn"][layer])
            if self.score_role
            else jnp.ones((b, self.num_patches), jnp.float32)
            for layer in self.score_layers
        }
        kept = self.plan.select(rng_mask, scores, stage)

        relation_targets = self._relation_targets(frozen, images, tout, kept, rel_layers, on_kept)
        out = self.student.apply(
            {"params": params["student"]},
            normalize(images, self.mean, self.std, self.image_size),
            keep_indices=kept.input_indices,
            drop_after=kept.drop_after,
            attn_layers=rel_layers,
            train=True,
            rngs={"dropout": rng_drop},
        )
        metrics = {}
        total = 0.0
        if self.alpha > 0:
            target = self._feature_target(tout["feature"]["tokens"], kept)
            pred = out["tokens"]
            if self.head is not None:
                pred = self.head.apply({"params": params["head"]}, pred)
            feat = losses.feature_loss(pred, target, lcfg.feature_loss, lcfg.smooth_l1_beta)
            metrics["feature_loss"] = feat
            total = total + self.alpha * feat
        if rel_layers:
            rel = jnp.mean(
                jnp.stack(
                    [
                        losses.relation_loss(
                            relation_targets[layer], out["attn_logits"][layer], lcfg.relation_loss
                        )
                        for layer in rel_layers
                    ]
                )
            )
            metrics["relation_loss"] = rel
            total = total + self.beta * rel
        metrics["loss"] = total
        return total, metrics

    def _feature_target(self, teacher_tokens, kept: masking.KeptTokens) -> jax.Array:
        """The feature teacher's CLS and the student's final patches, from its full-image tokens."""
        p = self.teachers["feature"].model.num_prefix
        patches = gather_tokens(teacher_tokens[:, p:], kept.final_indices)
        target = jnp.concatenate([teacher_tokens[:, :1], patches], axis=1)
        return losses.whiten(target) if self.config.loss.whiten_target else target

    def _relation_targets(
        self, frozen, images, tout, kept: masking.KeptTokens, layers, on_kept: bool
    ) -> dict:
        """{layer: relation teacher logits over CLS + the patches that student block sees}.

        Default: the full-image teacher's logits at those rows and columns, as the product of its
        queries and keys at those tokens. ``on_kept``: the relation teacher itself runs on the student's
        token sets (same input patches, same drops).
        """
        if not layers:
            return {}
        teacher = self.teachers["relation"]
        if on_kept:
            # Drops after the last distilled layer change no target: the teacher stops needing tokens there.
            drops = {k: v for k, v in (kept.drop_after or {}).items() if k < max(layers)}
            return teacher(
                frozen["relation"],
                images,
                keep_indices=kept.input_indices,
                drop_after=drops,
                attn_layers=layers,
            )["attn_logits"]
        b = images.shape[0]
        cls = jnp.zeros((b, 1), jnp.int32)
        p = teacher.model.num_prefix
        return {
            layer: losses.relation_logits(
                *tout["relation"]["qk"][layer], jnp.concatenate([cls, kept.patches_at(layer) + p], axis=1)
            )
            for layer in layers
        }

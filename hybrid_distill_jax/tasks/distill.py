"""The Hybrid Distill objective: frozen teachers -> targets -> kept tokens -> student -> loss terms.

``L = alpha * L_feat(T_c -> S) + beta * L_rel(T_m -> S)``. FD-only (beta=0), relation-only (alpha=0),
random masking (``masking.selection='random'``) and no masking (mask ratios 0) are configurations of
this one objective.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_distill_jax import losses, masking
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.build import FrozenTeacher, normalize, vit_from_config
from hybrid_distill_jax.tasks.base import Task, register


@register
class DistillTask(Task):
    """Student (+ linear feature head) trained against a feature teacher and a relation teacher."""

    name = "distill"

    def __init__(self, config, num_classes: int = 0):
        super().__init__(config, num_classes)
        scfg, lcfg, mcfg = config.student, config.loss, config.masking
        self.student = vit_from_config(scfg, "student", image_size=config.image_size, num_classes=0)
        self.mean, self.std = tuple(scfg.mean), tuple(scfg.std)
        self.alpha, self.beta = float(lcfg.alpha), float(lcfg.beta)
        self.depth = self.student.depth
        self.relation_layers = (
            tuple(lcfg.relation_layers) if lcfg.relation_layers is not None else tuple(range(1, self.depth))
        )
        self.score_source = mcfg.score_source
        self.teachers = {}
        needs_feature = self.alpha > 0 or self.score_source == "feature_teacher"
        needs_relation = (self.beta > 0 and self.relation_layers) or self.score_source == "relation_teacher"
        if needs_feature:
            self.teachers["feature"], self.frozen["feature"] = FrozenTeacher.load(
                config.teachers.feature, "teachers.feature"
            )
        if needs_relation:
            self.teachers["relation"], self.frozen["relation"] = FrozenTeacher.load(
                config.teachers.relation, "teachers.relation"
            )
        self._check_compatible()
        self.num_patches = self.student.grid**2
        self.mode = mcfg.mode
        if self.mode == "over_training":
            self.schedule = masking.KeepSchedule(tuple(mcfg.stage_starts), tuple(mcfg.stage_ratios))
        self.feature_width = self.teachers["feature"].model.width if "feature" in self.teachers else 0
        self.head = None
        if self.alpha > 0 and not (lcfg.head == "identity" and self.feature_width == self.student.width):
            self.head = nn.Dense(
                self.feature_width,
                dtype=self.student.dtype,
                param_dtype=self.student.param_dtype,
                name="head",
            )

    # -- validation that needs the loaded teachers ---------------------------------------------------
    def _check_compatible(self):
        grid = self.student.grid
        if self.student.dist_token:
            raise ConfigError("student.dist_token=True: the student must have a single CLS prefix token")
        for role, t in self.teachers.items():
            if t.image_size % t.model.patch_size:
                raise ConfigError(
                    f"teachers.{role}.image_size={t.image_size} is not divisible by its patch "
                    f"size {t.model.patch_size}"
                )
            if t.grid != grid:
                raise ConfigError(
                    f"teachers.{role}: patch grid {t.grid}x{t.grid} ({t.image_size}px / patch "
                    f"{t.model.patch_size}) differs from the student's {grid}x{grid}; set "
                    f"teachers.{role}.image_size={grid * t.model.patch_size}"
                )
        for layer in self.relation_layers:
            if not 1 <= layer < self.depth:
                raise ConfigError(
                    f"loss.relation_layers: layer {layer} is outside 1..{self.depth - 1} (the last "
                    f"block, {self.depth}, belongs to the feature term)"
                )
        if "relation" in self.teachers and self.beta > 0:
            rel = self.teachers["relation"].model
            for layer in self.relation_layers:
                if layer > rel.depth:
                    raise ConfigError(
                        f"loss.relation_layers: layer {layer} exceeds the relation teacher's "
                        f"depth {rel.depth}"
                    )
            if self.config.loss.relation_teacher_on_kept and rel.num_prefix != 1:
                raise ConfigError(
                    "loss.relation_teacher_on_kept=True needs a relation teacher with one prefix (CLS) token"
                )
            if rel.num_heads != self.student.num_heads:
                raise ConfigError(
                    f"loss.relation_layers: the relation teacher has {rel.num_heads} heads per layer, the "
                    f"student {self.student.num_heads}; head counts must match on distilled layers"
                )
        mcfg = self.config.masking
        if mcfg.mode == "over_depth":
            layers = tuple(mcfg.drop_layers)
            if len(layers) != len(mcfg.drop_ratios) or not layers:
                raise ConfigError(
                    "masking.drop_layers and masking.drop_ratios must be non-empty, equal length"
                )
            if list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= self.depth:
                raise ConfigError(
                    f"masking.drop_layers={list(layers)}: increasing layers in 1..{self.depth - 1}"
                )
            ratios = list(mcfg.drop_ratios)
            if ratios != sorted(ratios) or not all(0.0 <= r < 1.0 for r in ratios):
                raise ConfigError(f"masking.drop_ratios={ratios}: non-decreasing mask ratios in [0, 1)")
            source = self.teachers.get("relation" if self.score_source == "relation_teacher" else "feature")
            if self.score_source != "uniform" and source is not None and layers[-1] > source.model.depth:
                raise ConfigError(
                    f"masking.drop_layers: layer {layers[-1]} exceeds the scoring teacher's depth"
                )

    # -- task interface ------------------------------------------------------------------------------
    @property
    def vit(self):
        return self.student

    def vit_params(self, params):
        return params["student"]

    def init_params(self, rng):
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        params = {"student": self.student.init(rng, x)["params"]}
        if self.head is not None:
            params["head"] = self.head.init(rng, jnp.zeros((1, 1, self.student.width)))["params"]
        return params

    def stage(self, step: int, total_steps: int):
        """Static token counts: K for `over_training`, the per-drop counts for `over_depth`."""
        if self.mode == "over_training":
            return masking.keep_count(self.num_patches, self.schedule.mask_ratio(step, total_steps))
        return tuple(masking.keep_count(self.num_patches, r) for r in self.config.masking.drop_ratios)

    def stage_metrics(self, stage) -> dict[str, float]:
        return {"keep": stage if isinstance(stage, int) else -1}

    def _scores(self, teacher_out: dict, layer: int, shape) -> jax.Array:
        if self.score_source == "uniform":
            return jnp.ones(shape, jnp.float32)
        return masking.redundancy_scores(teacher_out[self.score_source.split("_")[0]]["cls_attn"][layer])

    def loss_fn(self, params, frozen, batch, rng, stage):
        mcfg, lcfg = self.config.masking, self.config.loss
        images = batch["image"]
        b = images.shape[0]
        rng_mask, rng_drop = jax.random.split(rng)
        over_depth = self.mode == "over_depth"
        drop_layers = tuple(mcfg.drop_layers) if over_depth else ()

        # Teachers on the full image. Only the requested attention maps are materialised.
        tout = {}
        score_layers = {"feature": (), "relation": ()}
        if self.score_source != "uniform":
            src = self.score_source.split("_")[0]
            score_layers[src] = drop_layers or (self.teachers[src].model.depth,)
        if "feature" in self.teachers:
            tout["feature"] = self.teachers["feature"](
                frozen["feature"], images, cls_attn_layers=score_layers["feature"]
            )
        run_relation_full = "relation" in self.teachers and not lcfg.relation_teacher_on_kept
        if run_relation_full or score_layers["relation"]:
            tout["relation"] = self.teachers["relation"](
                frozen["relation"],
                images,
                cls_attn_layers=score_layers["relation"],
                attn_layers=self.relation_layers if run_relation_full and self.beta > 0 else (),
            )

        # Kept tokens: one set at the input (over_training) or nested sets inside the student (over_depth).
        n = self.num_patches
        if over_depth:
            scores = [self._scores(tout, layer, (b, n)) for layer in drop_layers]
            relative, absolute = masking.nested_selection(
                rng_mask, scores, stage, mcfg.selection, mcfg.temperature
            )
            keep_input = None
            drop_after = dict(zip(drop_layers, relative))
            final_idx = absolute[-1]
        else:
            k = stage
            if k == n:
                keep_input = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            else:
                layer = (
                    self.teachers[self.score_source.split("_")[0]].model.depth
                    if (self.score_source != "uniform")
                    else 0
                )
                keep_input = masking.select_tokens(
                    rng_mask, self._scores(tout, layer, (b, n)), k, mcfg.selection, mcfg.temperature
                )
            drop_after, final_idx = None, keep_input

        def patch_set_at(layer: int):
            """Absolute patch indices of the tokens block `layer` attends over."""
            if not over_depth:
                return keep_input
            current = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            for d, idx in zip(drop_layers, absolute):
                if d < layer:
                    current = idx
            return current

        relation_targets = {}
        if self.beta > 0 and self.relation_layers:
            rel_teacher = self.teachers["relation"]
            if lcfg.relation_teacher_on_kept and not over_depth:
                tout_kept = rel_teacher(
                    frozen["relation"], images, keep_indices=keep_input, attn_layers=self.relation_layers
                )
                relation_targets = {layer: tout_kept["attn_logits"][layer] for layer in self.relation_layers}
            else:
                p = rel_teacher.model.num_prefix
                for layer in self.relation_layers:
                    token_idx = jnp.concatenate(
                        [jnp.zeros((b, 1), jnp.int32), patch_set_at(layer) + p], axis=1
                    )
                    relation_targets[layer] = losses.gather_relation(
                        tout["relation"]["attn_logits"][layer], token_idx
                    )

        feature_target = None
        if self.alpha > 0:
            ftok = tout["feature"]["tokens"]
            p = self.teachers["feature"].model.num_prefix
            feature_target = jnp.concatenate(
                [ftok[:, :1], jnp.take_along_axis(ftok[:, p:], final_idx[..., None], axis=1)], axis=1
            )
            if lcfg.whiten_target:
                feature_target = losses.whiten(feature_target)

        out = self.student.apply(
            {"params": params["student"]},
            normalize(images, self.mean, self.std, self.image_size),
            keep_indices=None if over_depth else keep_input,
            drop_after=drop_after,
            attn_layers=self.relation_layers if self.beta > 0 else (),
            train=True,
            rngs={"dropout": rng_drop},
        )
        metrics = {}
        total = 0.0
        if self.alpha > 0:
            pred = out["tokens"]
            if self.head is not None:
                pred = self.head.apply({"params": params["head"]}, pred)
            feat = losses.feature_loss(pred, feature_target, lcfg.feature_loss, lcfg.smooth_l1_beta)
            metrics["feature_loss"] = feat
            total = total + self.alpha * feat
        if self.beta > 0 and self.relation_layers:
            rel = jnp.mean(
                jnp.stack(
                    [
                        losses.relation_loss(
                            relation_targets[layer], out["attn_logits"][layer], lcfg.relation_loss
                        )
                        for layer in self.relation_layers
                    ]
                )
            )
            metrics["relation_loss"] = rel
            total = total + self.beta * rel
        metrics["loss"] = total
        return total, metrics

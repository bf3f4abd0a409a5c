"""The distillation objective: named frozen teachers -> kept tokens -> student -> named loss terms.

``L = sum over config.terms of weight * term``. Each term names its teacher (``config.teachers``) and a
kind (``hybrid_distill_jax.terms``): ``tokens`` regression (final tokens or block l's), attention
``relations`` at chosen blocks, a summary ``embedding``. Hybrid Distill is two teachers and two terms (the
defaults here); FD-only, relation-only, random or no masking, and three-teacher objectives are
configurations of this one task. Which patches are kept, and where, is the ``masking.KeepPlan``'s
business; the patches are scored by ``masking.score_teacher``'s CLS attention (or ``masking.score``'s
other choices, for a teacher without CLS). A teacher whose patch grid differs from the student's has its
patch outputs resampled onto the student's grid when its entry says ``interpolate_grid``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hybrid_distill_jax import checks, errors, masking, terms
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.build import check_model_config, model_defaults, normalize, vit_from_config
from hybrid_distill_jax.models.vit import arch_dict, forward_flops
from hybrid_distill_jax.parallel import sharding
from hybrid_distill_jax.tasks.base import Task, register
from hybrid_distill_jax.teachers import (
    FrozenTeacher,
    check_teacher_entry,
    describe_for_validation,
    teacher_config,
)
from hybrid_distill_jax.terms import target_norm

log = logging.getLogger("hybrid_distill_jax")
TARGET_STATS_FILE = "target_stats.npz"


def add_defaults(c: ml_collections.ConfigDict) -> None:
    """The distill sections of ``base_config('distill')``: Hybrid Distill's two teachers and two terms."""
    c.student = ml_collections.ConfigDict(model_defaults())
    c.teachers = ml_collections.ConfigDict(dict(deit=teacher_config(), mae=teacher_config()))
    c.terms = ml_collections.ConfigDict(
        dict(
            feature=terms.term_config("tokens", "deit"),
            relation=terms.term_config("relations", "mae"),
        )
    )
    c.masking = masking.section()


def active_terms(config, student_depth: int) -> dict[str, Any]:
    """{name: config entry} of the terms that contribute (a positive weight; relations: some layer)."""
    return {
        name: cfg
        for name, cfg in config.terms.items()
        if terms.term_class(cfg.kind, f"terms.{name}").is_active(cfg, student_depth)
    }


def teachers_used(config, student_depth: int) -> tuple[str, ...]:
    """The teachers the objective loads: named by an active term, or scoring the patches; sorted."""
    used = {cfg.teacher for cfg in active_terms(config, student_depth).values()}
    if config.masking.score_teacher:
        used.add(config.masking.score_teacher)
    return tuple(sorted(used))


def check_fields(config) -> dict:
    """Every distill field that needs neither teacher weights nor data; returns the student's
    description (``check_model_config``'s)."""
    s = check_model_config(config.student, config.image_size, "student")
    checks.require(
        not config.student.get("dist_token", False),
        "student.dist_token=True: the student must have a single CLS prefix token",
    )
    checks.require(
        config.student.get("class_token", True),
        "student.class_token=False: the terms read the student's CLS token; a student needs one",
    )
    checks.require(len(config.teachers) > 0, "teachers: no teacher; name one, e.g. teachers.deit")
    for name, tcfg in config.teachers.items():
        check_teacher_entry(name, tcfg)
    checks.require(len(config.terms) > 0, "terms: no loss term; see docs/METHOD.md, 'Objective'")
    for name, cfg in config.terms.items():
        field = f"terms.{name}"
        checks.require(
            isinstance(cfg, ml_collections.ConfigDict) and "kind" in cfg,
            f"{field}: expected a term entry (kind, teacher, weight, ...); build it with terms.term_config",
        )
        cls = terms.term_class(cfg.kind, field)
        checks.require(
            cfg.teacher in config.teachers,
            f"{field}.teacher={cfg.teacher!r}: no such teacher; config.teachers has "
            f"{', '.join(sorted(config.teachers))}",
        )
        cls.check_fields(name, cfg, s["depth"])
    active = active_terms(config, s["depth"])
    checks.require(bool(active), "terms: every term has weight 0 (or no layer): nothing to distil")
    groups: dict[str, list[str]] = {}
    for name, cfg in active.items():
        if cfg.get("drop", "step") == "loss_aware":
            groups.setdefault(cfg.get("drop_group", ""), []).append(name)
    for group, names in groups.items():
        checks.require(
            len(names) > 1,
            f"terms.{names[0]}.drop='loss_aware': no other active loss-aware term in drop_group={group!r} "
            "to compete with; add one, or use drop='step'",
        )
    masking.check_section(config.masking, config.teachers)
    return s


def check_archs(config, archs: Mapping[str, Mapping[str, Any]]) -> None:
    """Student/teacher compatibility; raises a one-line ConfigError naming the field.

    ``archs``: ``'student'`` and each described teacher's name -> its architecture dict (``model.json``'s
    ``arch``, ``models.vit.arch_dict``) with ``image_size`` set to the resolution it runs at. Teachers
    missing from ``archs`` are not checked (validation before they are trained or fetched).
    """
    student = archs["student"]
    depth, grid = student["depth"], student["image_size"] // student["patch_size"]
    plan = masking.keep_plan(config.masking, grid**2, depth)
    needs_grid = {config.masking.score_teacher} - {""}
    active = active_terms(config, depth)
    for name, cfg in active.items():
        teacher = archs.get(cfg.teacher)
        cls = terms.term_class(cfg.kind, f"terms.{name}")
        if teacher is not None:
            cls.check_archs(name, cfg, student, teacher)
        if cls.needs_grid:
            needs_grid.add(cfg.teacher)
    for name in sorted(needs_grid & set(archs)):
        size, patch = archs[name]["image_size"], archs[name]["patch_size"]
        checks.require(
            size % patch == 0, f"teachers.{name}.image_size={size} is not divisible by its patch size {patch}"
        )
        checks.require(
            size // patch == grid or config.teachers[name].get("interpolate_grid", False),
            f"teachers.{name}: patch grid {size // patch}x{size // patch} differs from the student's "
            f"{grid}x{grid} ({size}px / patch {patch}); set teachers.{name}.image_size={grid * patch}, "
            f"or teachers.{name}.interpolate_grid=True to resample its outputs onto the student's grid",
        )
        if size // patch != grid:
            for term, cfg in active.items():
                checks.require(
                    not (cfg.teacher == name and cfg.get("teacher_on_kept", False)),
                    f"terms.{term}.teacher_on_kept=True runs teacher {name!r} on the student's kept patches, "
                    f"which index the student's {grid}x{grid} grid, not its {size // patch}x{size // patch} "
                    f"one: set teachers.{name}.image_size={grid * patch}, or teacher_on_kept=False",
                )
    scorer = archs.get(config.masking.score_teacher)
    if scorer is not None:
        masking.check_scorer(config.masking, scorer)
        deepest = max(plan.score_layers(scorer["depth"]))
        checks.require(
            deepest <= scorer["depth"],
            f"masking.drop_layers: layer {deepest} exceeds the scoring teacher's depth {scorer['depth']}",
        )


def check_config(config, *, check_teachers: bool = True, deviceless: bool = False) -> None:
    """``check_fields``, then ``check_archs`` against the teachers' descriptions (``model.json``, or a
    hub name's cached or listed description: validation never downloads). A hub teacher nothing
    describes yet is checked once it is loaded, unless ``deviceless`` (which needs every shape)."""
    student = check_fields(config)
    archs = {"student": {**student, "image_size": config.image_size}}
    for name in teachers_used(config, student["depth"]) if check_teachers else ():
        tcfg = config.teachers[name]
        meta = describe_for_validation(tcfg.checkpoint, f"teachers.{name}.checkpoint", deviceless)
        if meta is not None:
            archs[name] = {**meta["arch"], "image_size": tcfg.image_size or meta["input"]["image_size"]}
    check_archs(config, archs)


def _union(asks: list[dict[str, tuple]]) -> dict[str, tuple]:
    """Keyword arguments of one ViT pass that serve every ask ({argument: layers}): the layers merged."""
    merged: dict[str, set] = {}
    for ask in asks:
        for key, layers in ask.items():
            merged.setdefault(key, set()).update(layers)
    return {key: tuple(sorted(layers)) for key, layers in merged.items()}


@register
class DistillTask(Task):
    """A student trained against named frozen teachers through named loss terms."""

    name = "distill"
    add_defaults = staticmethod(add_defaults)
    check_config = staticmethod(check_config)

    def __init__(self, config, num_classes: int = 0, *, abstract: bool = False, platform: str | None = None):
        super().__init__(config, num_classes, abstract=abstract, platform=platform)
        scfg, mcfg = config.student, config.masking
        self.student = vit_from_config(
            scfg, "student", platform=self.platform, image_size=config.image_size, num_classes=0
        )
        self.mean, self.std = tuple(scfg.mean), tuple(scfg.std)
        self.depth = self.student.depth
        self.num_patches = self.student.grid**2
        self.teachers = {}
        for name in teachers_used(config, self.depth):
            self.teachers[name], self.frozen[name] = FrozenTeacher.load(
                config.teachers[name], f"teachers.{name}", abstract=abstract, platform=self.platform
            )
            log.info("teachers.%s: %s", name, json.dumps(self.teachers[name].source))
        archs = {
            name: {**arch_dict(t.model), "image_size": t.image_size} for name, t in self.teachers.items()
        }
        check_archs(config, {"student": {**arch_dict(self.student), "image_size": self.image_size}, **archs})
        self.terms = {
            name: terms.build_term(name, cfg, self.student, self.teachers[cfg.teacher])
            for name, cfg in active_terms(config, self.depth).items()
        }
        # the terms whose targets keep statistics in the train state (``init_stats``)
        self.stat_terms = {
            name: term
            for name, term in self.terms.items()
            if isinstance(term, terms.NormalizedTargets) and term.keeps_stats
        }
        self.plan = masking.keep_plan(mcfg, self.num_patches, self.depth)
        self.score_teacher = mcfg.score_teacher
        scorer_depth = self.teachers[self.score_teacher].model.depth if self.score_teacher else self.depth
        self.score_layers = self.plan.score_layers(scorer_depth)
        # What each model's pass must return, fixed per task: {teacher: keyword arguments of its one
        # full-image pass} (its terms' asks, and the scorer's CLS attention at the plan's layers), and the
        # student's keyword arguments.
        asks: dict[str, list] = {}
        for term in self.terms.values():
            if (ask := term.teacher_outputs()) is not None:
                asks.setdefault(term.cfg.teacher, []).append(ask)
        self.score = mcfg.score
        if self.score_teacher:
            scorer_ask = masking.score_request(self.score, self.score_layers)
            asks.setdefault(self.score_teacher, []).append(scorer_ask)
        self.teacher_requests = {name: _union(asks[name]) for name in sorted(asks)}
        self.student_request = _union([term.student_outputs() for term in self.terms.values()])

    # -- task interface ------------------------------------------------------------------------------
    @property
    def vit(self):
        return self.student

    def vit_params(self, params):
        return params["student"]

    def export_metadata(self) -> dict:
        teachers = {name: t.source for name, t in self.teachers.items()}
        return dict(super().export_metadata(), teachers=teachers)

    def export(self, params, directory, stats=None):
        """The student (``Task.export``) and, for the terms that keep target statistics, those statistics
        in ``target_stats.npz`` (arrays ``TERM/FIELD``), described under ``target_norms`` in model.json:
        what maps the student's head outputs back to each teacher's space."""
        described = {name: term.describe_stats() for name, term in self.stat_terms.items()}
        extra = dict(self.export_metadata())
        if stats and described:
            extra["target_norms"] = dict(file=TARGET_STATS_FILE, terms=described)
        path = model_io.save_model(
            directory, self.student, self.vit_params(params), mean=self.mean, std=self.std, extra=extra
        )
        if stats and described:
            arrays = {f"{name}/{key}": np.asarray(v) for name in described for key, v in stats[name].items()}
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            errors.write_atomically(os.path.join(directory, TARGET_STATS_FILE), buffer.getvalue())
        return path

    def init_params(self, rng):
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        params = {"student": self.student.init(rng, x)["params"]}
        # Each head from the run's init key, like the student: adding or removing a term changes no other
        # term's initial head.
        heads = {name: term.init_params(rng) for name, term in self.terms.items()}
        heads = {name: p for name, p in heads.items() if p is not None}
        if heads:
            params["heads"] = heads
        return params

    def stage(self, step: int, total_steps: int):
        """The plan's static token counts."""
        return self.plan.stage(step, total_steps)

    def stage_metrics(self, stage) -> dict[str, float]:
        return self.plan.stage_metrics(stage)

    def stages(self, total_steps: int):
        return self.plan.stages(total_steps)

    def flops_per_example(self, stage) -> dict[str, float]:
        """Student forward + backward (3x forward; heads included), each teacher's forward passes (a
        full-image pass no term reads the final tokens of runs only up to the deepest block asked for)."""
        patches = self.plan.patches_per_block(stage, self.depth)
        out = {"student_fwd_bwd": 3 * forward_flops(self.student, patches, self.image_size)}
        for name, request in self.teacher_requests.items():
            t = self.teachers[name]
            final = any(term.reads_final_tokens for term in self.terms.values() if term.cfg.teacher == name)
            final = final or (name == self.score_teacher and self.score == "map_attention")
            blocks = t.model.depth if final else max(max(layers) for layers in request.values())
            model = (
                t.model
                if blocks == t.model.depth
                else t.model.clone(depth=blocks, num_classes=0, proj_dim=None)
            )
            out[f"{name}_teacher_fwd"] = forward_flops(model, [t.grid**2] * blocks, t.image_size)
        for term in self.terms.values():
            for part, flops in term.flops_per_example(patches).items():
                out[part] = out.get(part, 0.0) + flops
        out["total"] = sum(out.values())
        return out

    # -- statistics of the targets (``terms.target_norm``) -------------------------------------------
    def init_stats(self):
        return {name: term.init_stats() for name, term in self.stat_terms.items()} or None

    def update_stats(self, stats, moments, step):
        return {
            name: term.updated_stats(stats[name], moments[name], step) if name in moments else stats[name]
            for name, term in self.stat_terms.items()
        }

    @property
    def estimation_batches(self) -> int:
        return max((t.estimation_batches for t in self.stat_terms.values()), default=0)

    def estimate_stats(self, frozen, stats, batches):
        """PHI-S's statistics from the teachers' outputs on ``batches`` (each term reads its first
        ``phi_s_batches``); the other terms' statistics as they are."""
        estimating = {n: t for n, t in self.stat_terms.items() if t.estimation_batches}

        @jax.jit
        def moments(frozen, images):
            tout = self.teacher_passes(frozen, images)
            return {
                name: term.estimation_moments(tout[term.cfg.teacher]) for name, term in estimating.items()
            }

        seen: dict[str, list] = {name: [] for name in estimating}
        for i, batch in enumerate(batches):
            out = sharding.to_host(moments(frozen, batch["image"]))
            for name, term in estimating.items():
                if i < term.estimation_batches:
                    seen[name].append(out[name])
        return dict(stats, **{name: target_norm.phi_s_stats(seen[name]) for name in estimating})

    def teacher_passes(self, frozen, images):
        """Every teacher once, on the full image and fused attention: no N x N map is formed. Each hands
        out what some term reads (queries and keys, hidden states) and the scorer its CLS attention."""
        return {
            name: self.teachers[name](frozen[name], images, grid=self.student.grid, **request)
            for name, request in self.teacher_requests.items()
        }

    def loss_fn(self, params, frozen, batch, rng, stage, stats=None, step=None):
        """(total, metrics); with ``stats`` (the train state's, ``init_stats``), ``metrics[STATS_KEY]``
        holds this batch's moments for ``update_stats``."""
        images = batch["image"]
        b = images.shape[0]
        rng_mask, rng_drop = jax.random.split(rng)
        tout = self.teacher_passes(frozen, images)
        scorer = self.teachers.get(self.score_teacher)
        scores = {
            layer: masking.patch_scores(self.score, tout[self.score_teacher], layer, scorer.model.num_prefix)
            if scorer
            else jnp.ones((b, self.num_patches), jnp.float32)
            for layer in self.score_layers
        }
        kept = self.plan.select(rng_mask, scores, stage)

        out = self.student.apply(
            {"params": params["student"]},
            normalize(images, self.mean, self.std, self.image_size),
            keep_indices=kept.input_indices,
            drop_after=kept.drop_after,
            train=True,
            rngs={"dropout": rng_drop},
            **self.student_request,
        )
        heads = params.get("heads", {})
        metrics, values, per_sample, moments = {}, {}, {}, {}
        for name, term in self.terms.items():
            teacher = term.cfg.teacher
            inputs = terms.TermInputs(
                student=out,
                teacher=tout.get(teacher),
                kept=kept,
                run_teacher=lambda t=teacher, **kw: self.teachers[t](frozen[t], images, **kw),
                stats=(stats or {}).get(name),
                step=step,
            )
            if term.drop == "loss_aware":
                per_sample[name] = term.value(heads.get(name), inputs, per_sample=True)
                metrics[f"{name}_loss"] = jnp.mean(per_sample[name])
            else:
                values[name] = metrics[f"{name}_loss"] = term.value(heads.get(name), inputs)
            if name in self.stat_terms and (m := term.batch_stats(inputs)) is not None:
                moments[name] = m
        for name, (value, kept_fraction) in self._loss_aware(per_sample, rng).items():
            values[name] = value
            metrics[f"{name}_kept"] = kept_fraction
        total = 0.0
        for name, term in self.terms.items():
            value = values[name]
            if term.drop == "step" and term.drop_prob:  # its own stream from the step's key
                value = jnp.where(
                    jax.random.bernoulli(self._drop_key(rng, name), 1.0 - term.drop_prob), value, 0.0
                )
            total = total + term.weight * value
        metrics["loss"] = total
        if stats is not None:
            metrics[self.STATS_KEY] = moments
        return total, metrics

    @staticmethod
    def _drop_key(rng, name: str) -> jax.Array:
        """A term's own random stream from the step's key: no other term's draws change with it."""
        return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)

    def _loss_aware(self, per_sample: dict[str, jax.Array], rng) -> dict[str, tuple]:
        """Loss-aware dropping: per ``drop_group`` and example, the term with the largest weighted loss is
        kept, each other one kept with probability 1 - its ``drop_prob``; then the mean over the batch.
        {name: (its value after the mask, the fraction of examples that kept it)}."""
        groups: dict[str, list[str]] = {}
        for name in per_sample:
            groups.setdefault(self.terms[name].drop_group, []).append(name)
        out = {}
        for names in groups.values():
            weighted = jnp.stack([self.terms[n].weight * per_sample[n] for n in names])
            draws = jnp.stack(
                [
                    jax.random.bernoulli(
                        self._drop_key(rng, n), 1.0 - self.terms[n].drop_prob, weighted.shape[1:]
                    )
                    for n in names
                ]
            )
            keep = terms.loss_aware_keep(weighted, draws)
            for name, kept in zip(names, keep, strict=True):
                out[name] = (
                    jnp.mean(jnp.where(kept, per_sample[name], 0.0)),
                    jnp.mean(kept.astype(jnp.float32)),
                )
        return out

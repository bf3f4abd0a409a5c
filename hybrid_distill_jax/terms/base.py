"""The loss-term interface and its registry: ``config.terms.NAME.kind`` -> a ``Term`` subclass.

A term compares the student with one named teacher (``config.terms.NAME.teacher``) and contributes
``weight * value`` to the objective. It says what it needs from each model before the step runs
(``teacher_outputs``, ``student_outputs``: keyword arguments of ``VisionTransformer.__call__``), so that
one jitted step runs every teacher once and asks it only for what some term reads. Adding a kind of term
= one subclass in its own module here, decorated with ``@register``, plus its test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.masking import KeptTokens
from hybrid_distill_jax.models.vit import VisionTransformer
from hybrid_distill_jax.teachers import FrozenTeacher

TERMS: dict[str, type[Term]] = {}
# Every term's fields. ``drop_prob``: the probability that the term is left out of the total, by ``drop``:
# 'step', the whole term for a whole step; 'loss_aware' (UNIC, DUNE), per example among the loss-aware
# terms of the same ``drop_group``: the one with the largest weighted loss on that example is always
# kept, each other one dropped with its ``drop_prob``.
DROPS = ("step", "loss_aware")
COMMON_FIELDS = dict(kind="", teacher="", weight=1.0, drop_prob=0.0, drop="step", drop_group="")


def loss_aware_keep(weighted: jax.Array, draws: jax.Array) -> jax.Array:
    """Which terms an example keeps under loss-aware dropping: ``weighted`` [T, B], each term's weighted
    loss per example; ``draws`` [T, B], True where a term's own draw keeps it. An example always keeps
    its largest term (the first, on a tie), and the others where drawn. Returns bool [T, B]."""
    worst = jnp.argmax(weighted, axis=0)
    return (jnp.arange(weighted.shape[0])[:, None] == worst[None, :]) | draws


def register(cls: type[Term]) -> type[Term]:
    """Class decorator: makes ``cls`` the term of ``kind == cls.kind``."""
    TERMS[cls.kind] = cls
    return cls


def term_config(kind: str, teacher: str, **fields) -> ml_collections.ConfigDict:
    """A ``config.terms`` entry: ``kind``'s defaults with ``fields`` changed."""
    cls = term_class(kind, "term_config")
    unknown = sorted(set(fields) - set(cls.defaults) - set(COMMON_FIELDS))
    if unknown:
        raise ConfigError(f"term_config({kind!r}): no field {unknown[0]!r}; fields: {sorted(cls.defaults)}")
    entry = dict(COMMON_FIELDS, kind=kind, teacher=teacher, **cls.defaults)
    entry.update(fields)
    c = ml_collections.ConfigDict(entry)
    for key, default in cls.defaults.items():  # optional tuples: None now, a tuple from the command line
        if default is None and key not in fields:
            c[key] = ml_collections.FieldReference(None, field_type=tuple)
    return c


def term_class(kind: str, field: str) -> type[Term]:
    if kind not in TERMS:
        raise ConfigError(f"{field}.kind={kind!r}: expected one of {sorted(TERMS)}")
    return TERMS[kind]


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What a term's ``value`` reads inside the step.

    ``student``/``teacher``: the outputs of the student and of this term's teacher on the full image (the
    teacher's None when no term asked it for anything); ``kept``: the patches the student keeps, where;
    ``run_teacher(**kwargs)``: a further pass of this term's frozen teacher on the batch, for terms whose
    target depends on the kept tokens; ``stats``: the statistics the term keeps in the train state
    (``target_norm.NormalizedTargets``), ``step`` the step being taken (0-based).
    """

    student: dict
    teacher: dict | None
    kept: KeptTokens
    run_teacher: Callable[..., dict]
    stats: Any = None
    step: jax.Array | None = None


class Term:
    """Base class: a named loss term of one kind, built once per task from its config entry."""

    kind: ClassVar[str]
    defaults: ClassVar[dict]  # the kind's own fields and their defaults
    choices: ClassVar[dict[str, tuple]] = {}  # field -> allowed values
    ranges: ClassVar[dict[str, checks.Range]] = {}  # numeric field -> allowed range
    needs_grid: ClassVar[bool] = True  # targets are gathered per patch: the teacher's grid is the student's

    def __init__(self, name: str, cfg, student: VisionTransformer, teacher: FrozenTeacher):
        self.name, self.cfg, self.student, self.teacher = name, cfg, student, teacher
        self.weight = float(cfg.weight)
        self.drop_prob = float(cfg.get("drop_prob", 0.0))
        self.drop = cfg.get("drop", "step")
        self.drop_group = cfg.get("drop_group", "")

    # -- configuration -------------------------------------------------------------------------------
    @classmethod
    def check_fields(cls, name: str, cfg, student_depth: int) -> None:
        """Checks that need neither teacher nor data: the kind's fields, choices and ranges."""
        field = f"terms.{name}"
        known = set(COMMON_FIELDS) | set(cls.defaults)
        unknown = sorted(set(cfg.keys()) - known)
        checks.require(
            not unknown,
            f"{field}.{unknown[0] if unknown else ''}: not a field of a {cls.kind!r} term; "
            f"its fields: {', '.join(sorted(known))}",
        )
        checks.one_of(cfg.get("drop", "step"), DROPS, f"{field}.drop")
        for key, allowed in cls.choices.items():
            checks.one_of(cfg[key], allowed, f"{field}.{key}")
        common = {"weight": checks.NON_NEGATIVE, "drop_prob": checks.UNIT}
        checks.check_ranges(cfg, {**common, **cls.ranges}, prefix=f"{field}.")

    @classmethod
    def check_archs(cls, name: str, cfg, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> None:
        """Checks against the student's and the teacher's architecture dicts (``image_size`` included)."""

    @classmethod
    def is_active(cls, cfg, student_depth: int) -> bool:
        """Whether the term contributes (its teacher is then loaded): by default, a positive weight."""
        return cfg.weight > 0

    # -- the step ------------------------------------------------------------------------------------
    def teacher_outputs(self) -> dict[str, tuple] | None:
        """What the full-image teacher pass must return beside its final tokens, as ``VisionTransformer``
        keyword arguments (``qk_layers``, ``hidden_layers``, ...); None: no such pass for this term (it
        runs its teacher itself)."""
        return {}

    @property
    def reads_final_tokens(self) -> bool:
        """Whether ``value`` reads the full-image pass's final tokens (else only the blocks it asked for
        run: XLA drops the rest of the teacher from the step)."""
        return True

    def student_outputs(self) -> dict[str, tuple]:
        """What the student must return (``attn_layers``, ``hidden_layers``)."""
        return {}

    def init_params(self, rng: jax.Array) -> Any | None:
        """The term's own trained parameters (a projection head), or None."""
        return None

    def value(self, params, inputs: TermInputs, per_sample: bool = False) -> jax.Array:
        """The term's scalar loss (fp32), or with ``per_sample`` one per example, [B] (their mean is the
        scalar); ``params``: its own (``init_params``) or None."""
        raise NotImplementedError

    def flops_per_example(self, patches_per_block) -> dict[str, float]:
        """Matmul FLOPs the term adds per example beyond the student's and the full-image teacher passes,
        by part of ``Task.flops_per_example`` (a head: ``student_fwd_bwd``; a teacher pass of its own:
        ``NAME_teacher_fwd``). ``patches_per_block``: the patch count each student block sees."""
        return {}


def build_term(name: str, cfg, student: VisionTransformer, teacher: FrozenTeacher) -> Term:
    return term_class(cfg.kind, f"terms.{name}")(name, cfg, student, teacher)

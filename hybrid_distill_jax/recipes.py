"""What the ImageNet distillation recipes (``configs/hd*.py``) share, so each recipe says only what is
its own: its name, its student, its teachers and its terms.
"""

from __future__ import annotations

import ml_collections

from hybrid_distill_jax import teachers
from hybrid_distill_jax.config_lib import base_config


def imagenet_distill(
    name: str,
    arg: str | None,
    known: dict[str, str],
    *,
    variant: str,
    drop_path: float,
    feature_teacher: str = "",
    teacher_fields: dict[str, dict] | None = None,
) -> ml_collections.ConfigDict:
    """``base_config('distill')`` for recipe ``name`` at 224 px: a bf16 ``variant`` student, 300 epochs at
    batch 2048 with 20 warm-up epochs, and ``config.teachers`` named as ``known``'s keys, in that order.

    Each teacher's checkpoint is the hub name of its known teacher (``known``: config name -> short name,
    ``teachers.known``), unless ``arg`` ('A,B,...', the recipe's ``--config`` argument) gives directories
    or hub names for the first ones. ``feature_teacher``: the teacher whose final tokens the student
    regresses (``terms.feature``) and whose CLS attention scores the patches, when not ``base_config``'s
    ``deit``. ``teacher_fields``: more ``teacher_config`` fields by config name.
    """
    given = arg.split(",") if arg else []
    if len(given) > len(known):
        raise ValueError(f"{len(given)} teachers given, the recipe has {len(known)}: {', '.join(known)}")
    checkpoints = given + [teachers.hub_name(short) for short in list(known.values())[len(given) :]]
    fields = teacher_fields or {}
    c = base_config("distill")
    c.name = name
    c.image_size = 224
    c.student.variant = variant
    c.student.drop_path = drop_path
    c.student.dtype = "bfloat16"  # compute in bf16; parameters, softmax and losses stay fp32
    c.teachers = ml_collections.ConfigDict(
        {
            teacher: teachers.teacher_config(path, **fields.get(teacher, {}))
            for teacher, path in zip(known, checkpoints, strict=True)
        }
    )
    if feature_teacher:
        c.terms.feature.teacher = c.masking.score_teacher = feature_teacher  # relations stay MAE's
    c.total_epochs = 300.0
    c.batch_size = 2048
    c.optim.warmup_epochs = 20.0
    return c

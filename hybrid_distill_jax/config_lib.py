"""Default configuration and up-front validation.

Recipes in ``configs/`` start from ``base_config(mode)`` and change what they need. ``validate``
runs before anything is built, so a wrong value fails in a second with one line naming the field.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from hybrid_distill_jax import masking
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.losses import FEATURE_LOSSES, RELATION_LOSSES
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import decode_variant

MODES = ("distill", "supervised", "mae")


def base_config(mode: str = "distill") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = mode
    c.name = mode
    c.seed = 0
    c.image_size = 224
    c.batch_size = 1024  # global, over all devices and processes
    c.total_steps = 0  # one of total_steps / total_epochs (steps win when both are set)
    c.total_epochs = 300.0

    c.data = ml_collections.ConfigDict(
        dict(
            name="imagenet2012",
            data_dir=None,
            train_split="train",
            eval_split="validation",
            crop_scale=(0.2, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip=True,
            shuffle_buffer=50_000,
            prefetch=2,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=0.0,
            base_lr=1.5e-4,
            min_lr=1e-5,
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            grad_clip=3.0,
            warmup_steps=0,
            warmup_epochs=20.0,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1))

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.tensorboard = True
    c.eval = ml_collections.ConfigDict(
        dict(
            at_end=True,
            knn=True,
            linear=True,
            pool="cls",
            batch_size=256,
            max_train=50_000,
            max_test=10_000,
            knn_k=20,
            knn_temperature=0.07,
            linear_epochs=30,
        )
    )
    c.export_dir = ""  # default: WORKDIR/export

    if mode == "distill":
        c.student = ml_collections.ConfigDict(
            dict(
                variant="B/16",
                drop_path=0.1,
                dtype="float32",
                param_dtype="float32",
                remat=False,
                mean=model_io.IMAGENET_MEAN,
                std=model_io.IMAGENET_STD,
            )
        )
        c.teachers = ml_collections.ConfigDict(
            dict(
                feature=dict(checkpoint="", dtype="bfloat16", image_size=0),
                relation=dict(checkpoint="", dtype="bfloat16", image_size=0),
            )
        )
        c.loss = ml_collections.ConfigDict(
            dict(
                alpha=1.0,
                beta=1.0,
                feature_loss="smooth_l1",
                smooth_l1_beta=2.0,
                whiten_target=True,
                head="linear",
                relation_loss="kl",
                relation_layers=ml_collections.FieldReference(None, tuple),
                relation_teacher_on_kept=False,
            )
        )
        c.masking = ml_collections.ConfigDict(
            dict(
                mode="over_training",
                selection="gumbel",
                temperature=1.0,
                score_source="feature_teacher",
                stage_starts=(0.0, 0.3, 0.6),
                stage_ratios=(0.0, 0.25, 0.5),
                drop_layers=(4, 7, 10),
                drop_ratios=(0.25, 0.4, 0.5),
            )
        )
    else:
        c.model = ml_collections.ConfigDict(
            dict(
                variant="B/16",
                drop_path=0.1,
                dtype="float32",
                param_dtype="float32",
                remat=False,
                mean=model_io.IMAGENET_MEAN,
                std=model_io.IMAGENET_STD,
                pool="cls",
            )
        )
        c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1))
        c.mae = ml_collections.ConfigDict(
            dict(
                mask_ratio=0.75,
                decoder_width=512,
                decoder_depth=8,
                decoder_heads=16,
                norm_pix_loss=True,
            )
        )
        if mode == "mae":
            c.model.posemb = "sincos2d"
            c.eval.pool = "gap"
    return c


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _in(value, choices, field: str) -> None:
    _require(value in choices, f"{field}={value!r}: expected one of {list(choices)}")


def _check_model(mcfg, image_size: int, field: str) -> dict:
    arch = decode_variant(mcfg.variant) if mcfg.get("variant") else {}
    patch = mcfg.get("patch_size", arch.get("patch_size"))
    _require(patch is not None and patch > 0, f"{field}.patch_size: a positive patch size is required")
    _require(
        image_size % patch == 0, f"image_size={image_size} is not divisible by {field} patch size {patch}"
    )
    _require(0.0 <= mcfg.get("drop_path", 0.0) < 1.0, f"{field}.drop_path must lie in [0, 1)")
    width = mcfg.get("width", arch.get("width"))
    heads = mcfg.get("num_heads", arch.get("num_heads"))
    _require(width % heads == 0, f"{field}: width {width} is not divisible by num_heads {heads}")
    return {"patch_size": patch, "depth": mcfg.get("depth", arch.get("depth")), "num_heads": heads}


def validate(config, num_devices: int | None = None, check_teachers: bool = True) -> None:
    """Checks every field that can be checked without data or model weights; raises ConfigError.

    ``check_teachers=False`` skips the teachers' files (for a chain that has yet to train them).
    """
    from hybrid_distill_jax.data import validate_data_config

    _in(config.mode, MODES, "config.mode")
    _require(config.image_size > 0, "image_size must be positive")
    _require(config.batch_size > 0, "batch_size must be positive")
    _require(config.total_steps > 0 or config.total_epochs > 0, "set total_steps or total_epochs (> 0)")
    num_devices = num_devices or jax.device_count()
    _require(
        config.batch_size % num_devices == 0,
        f"batch_size={config.batch_size} is not divisible by the {num_devices} devices; use a multiple "
        f"of {num_devices}",
    )
    _require(
        config.mesh.data in (-1, num_devices),
        f"mesh.data={config.mesh.data} does not match the {num_devices} devices (use -1 for all)",
    )
    _require(config.log_every > 0, "log_every must be positive")
    _require(config.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = only at the end)")
    _require(config.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    o = config.optim
    _require(o.lr >= 0 and o.base_lr > 0 and o.min_lr >= 0, "optim.lr/base_lr/min_lr must be non-negative")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1 and optim.b2 must lie in [0, 1)")
    _require(o.weight_decay >= 0 and o.grad_clip >= 0, "optim.weight_decay and optim.grad_clip must be >= 0")
    _in(config.eval.pool, ("cls", "gap"), "eval.pool")
    validate_data_config(config.data)

    if config.mode == "distill":
        s = _check_model(config.student, config.image_size, "student")
        lc, mc = config.loss, config.masking
        _in(lc.feature_loss, FEATURE_LOSSES, "loss.feature_loss")
        _in(lc.relation_loss, RELATION_LOSSES, "loss.relation_loss")
        _in(lc.head, ("linear", "identity"), "loss.head")
        _require(
            lc.alpha >= 0 and lc.beta >= 0 and lc.alpha + lc.beta > 0,
            "loss.alpha and loss.beta must be >= 0 and not both 0",
        )
        _in(mc.mode, masking.MODES, "masking.mode")
        _in(mc.selection, masking.SELECTIONS, "masking.selection")
        _in(mc.score_source, masking.SCORE_SOURCES, "masking.score_source")
        _require(mc.temperature > 0, "masking.temperature must be positive")
        if mc.mode == "over_training":
            masking.KeepSchedule(tuple(mc.stage_starts), tuple(mc.stage_ratios))
        for r in mc.drop_ratios:
            _require(
                0.0 <= r < 1.0, f"masking.drop_ratios={list(mc.drop_ratios)}: mask ratios must lie in [0, 1)"
            )
        layers = lc.relation_layers
        if layers is not None:
            for layer in layers:
                _require(
                    1 <= layer < s["depth"],
                    f"loss.relation_layers: layer {layer} is outside 1..{s['depth'] - 1} (the last block, "
                    f"{s['depth']}, belongs to the feature term)",
                )
        roles = []
        if lc.alpha > 0 or mc.score_source == "feature_teacher":
            roles.append("feature")
        if (lc.beta > 0 and (layers is None or len(layers))) or mc.score_source == "relation_teacher":
            roles.append("relation")
        student_grid = config.image_size // s["patch_size"]
        for role in roles if check_teachers else ():
            tcfg = config.teachers[role]
            meta = model_io.read_model_json(tcfg.checkpoint, f"teachers.{role}.checkpoint")
            size = tcfg.image_size or meta["input"]["image_size"]
            patch = meta["arch"]["patch_size"]
            _require(
                size % patch == 0, f"teachers.{role}.image_size={size} is not divisible by its patch {patch}"
            )
            _require(
                size // patch == student_grid,
                f"teachers.{role}: patch grid {size // patch}x{size // patch} differs from the student's "
                f"{student_grid}x{student_grid}; set teachers.{role}.image_size={student_grid * patch}",
            )
            if role == "relation" and lc.beta > 0:
                _require(
                    meta["arch"]["num_heads"] == s["num_heads"],
                    f"teachers.relation has {meta['arch']['num_heads']} heads, the student {s['num_heads']}: "
                    "head counts must match on every distilled layer",
                )
                depth = meta["arch"]["depth"]
                for layer in layers if layers is not None else range(1, s["depth"]):
                    _require(
                        layer <= depth,
                        f"loss.relation_layers: layer {layer} exceeds the relation teacher's depth {depth}",
                    )
    else:
        _check_model(config.model, config.image_size, "model")
        if config.mode == "mae":
            _require(0.0 < config.mae.mask_ratio < 1.0, "mae.mask_ratio must lie in (0, 1)")
        _require(
            0.0 <= config.loss.get("label_smoothing", 0.0) < 1.0, "loss.label_smoothing must lie in [0, 1)"
        )


def resolve_steps(config, num_train_examples: int) -> tuple[int, int, int]:
    """(total_steps, warmup_steps, steps_per_epoch) from the step or epoch settings."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
    warmup = config.optim.warmup_steps or int(round(config.optim.warmup_epochs * steps_per_epoch))
    return total, min(warmup, total), steps_per_epoch


def check_workdir(workdir: str) -> str:
    """Creates the workdir and proves it is writable before any training starts."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: not writable ({e.strerror})") from None
    return workdir

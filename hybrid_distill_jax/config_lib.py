"""Default configuration and up-front validation.

Recipes in ``configs/`` start from ``base_config(mode)`` and change what they need. ``validate``
runs before anything is built, so a wrong value fails in a second with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import ml_collections

from hybrid_distill_jax import masking, signals, workdir_lock
from hybrid_distill_jax.data.defaults import DATA_DEFAULTS
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.losses import FEATURE_LOSSES, RELATION_LOSSES
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import REMAT_POLICIES, decode_variant
from hybrid_distill_jax.parallel import sharding

MODES = ("distill", "supervised", "mae", "finetune", "evaluate")


def _model_defaults() -> dict:
    """The architecture and numerics fields shared by ``student`` (distill) and ``model`` (other modes)."""
    return dict(
        variant="B/16",
        drop_path=0.1,
        dtype="float32",
        param_dtype="float32",
        remat_policy="none",  # or 'full', 'dots_saveable', ... (models.vit.REMAT_POLICIES)
        mean=model_io.IMAGENET_MEAN,
        std=model_io.IMAGENET_STD,
    )


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
        dict(DATA_DEFAULTS, name="imagenet2012", data_dir=ml_collections.FieldReference(None, field_type=str))
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
    # Device mesh (docs/SCALING.md): sizes of the 'data', 'fsdp' and 'model' axes, one of them -1 (all
    # remaining devices); num_devices > 0 uses only the first N devices (single process, tests/benchmarks).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, num_devices=0))
    # Which arrays are split over the mesh: the trained parameters and their optimizer state ('student',
    # also for the supervised/mae modes' model) and the frozen teachers: 'replicated' or 'fsdp'. Rules
    # 'REGEX=SPEC' on paths like params/student/block1/mlp/fc1/kernel override (first match wins).
    c.sharding = ml_collections.ConfigDict(
        dict(student="replicated", teachers="replicated", rules=(), fsdp_min_size=2**14)
    )
    c.grad_accum_steps = 1  # micro-batches per step (jax.lax.scan); batch_size stays the global batch

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
            diagnostics_every=0,  # steps between attention diagnostics (diag/... scalars); 0 = off
            diagnostics_examples=256,  # the fixed eval-split images they are computed on
        )
    )
    c.export_dir = ""  # default: WORKDIR/export
    c.nonfinite_policy = "skip"  # a NaN/Inf loss or gradient: 'skip' the update (counted) or 'stop' the run
    # Fault injection, for tests of the guards: a NaN gradient at one step; a pause of pause_s seconds at
    # one phase of the run (signals.PHASES), during which tests send signals.
    c.faults = ml_collections.ConfigDict(dict(nan_at_step=-1, pause_at="", pause_s=0.0))

    if mode == "distill":
        c.student = ml_collections.ConfigDict(_model_defaults())
        c.teachers = ml_collections.ConfigDict(
            dict(
                feature=dict(checkpoint="", dtype="bfloat16", image_size=0, attn_impl="", fp8=False),
                relation=dict(checkpoint="", dtype="bfloat16", image_size=0, attn_impl="", fp8=False),
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
                _model_defaults(),
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
    if mode == "finetune":  # MAE's fine-tuning protocol (ViT-B: 100 epochs, blr 5e-4, layer decay 0.65)
        c.init_from = ""  # an exported/converted model directory; "" = train config.model from scratch
        c.model.pool = "gap"
        c.eval.pool = "gap"
        c.eval.knn = c.eval.linear = False  # the fine-tuned classifier's top-1 is always reported
        c.total_epochs = 100.0
        c.optim.update(dict(base_lr=5e-4, b2=0.999, min_lr=1e-6, warmup_epochs=5.0, grad_clip=0.0))
        c.finetune = ml_collections.ConfigDict(
            dict(layer_decay=0.65, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5)
        )
    elif mode == "evaluate":  # k-NN + linear probe (+ attention diagnostics) of config.model_dir
        c.model_dir = ""
        c.image_size = 0  # 0 = the model's own input resolution
        c.eval.diagnostics = True
    return c


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _in(value, choices, field: str) -> None:
    _require(value in choices, f"{field}={value!r}: expected one of {list(choices)}")


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field (each element, for a tuple) may take: a finite number from ``lo`` to
    ``hi`` (each end included unless open), an integer if ``integer``; ``also`` holds the sentinel values
    outside that interval which mean something (described by ``note``)."""

    lo: float
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = True
    integer: bool = False
    also: tuple = ()
    note: str = ""

    def holds(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if v in self.also:
            return True
        if (self.integer and not isinstance(v, int)) or not math.isfinite(v):
            return False
        above = self.lo < v if self.open_lo else self.lo <= v
        return above and (v < self.hi if self.open_hi else v <= self.hi)

    def message(self, field: str, value) -> str:
        ends = ("(" if self.open_lo else "[", ")" if self.open_hi or self.hi == math.inf else "]")
        interval = f"{ends[0]}{self.lo:g}, {self.hi:g}{ends[1]}"
        what = f"be an integer in {interval}" if self.integer else f"lie in {interval}"
        if self.also:
            what = f"be {' or '.join(map(str, self.also))} or {what.removeprefix('be ')}"
        each = " (each element)" if isinstance(value, (tuple, list)) else ""
        note = f" ({self.note})" if self.note else ""
        return f"{field} must {what}{each}{note}, got {value!r}"


def _ints(lo: int, note: str = "", also: tuple = ()) -> Range:
    return Range(lo, integer=True, also=also, note=note)


_UNIT = Range(0.0, 1.0)  # [0, 1): ratios, mask ratios, betas, drop rates
_PROBABILITY = Range(0.0, 1.0, open_hi=False)
_POSITIVE = Range(0.0, open_lo=True)
_NON_NEGATIVE = Range(0.0)
_MESH_AXIS = _ints(1, "-1: all remaining devices", also=(-1,))

# The range of every numeric field of base_config(mode), checked first by validate (config.data's are
# checked with the rest of the data section, by data.validate_data_config). Fields a mode lacks are skipped.
RANGES: dict[str, Range] = {
    "seed": _ints(0),
    "image_size": _ints(1),
    "batch_size": _ints(1),
    "total_steps": _ints(0, "0: from total_epochs"),
    "total_epochs": _NON_NEGATIVE,
    "grad_accum_steps": _ints(1),
    "log_every": _ints(1),
    "checkpoint_every": _ints(0, "0: only at the end"),
    "keep_checkpoints": _ints(1),
    "optim.lr": Range(0.0, note="0: from base_lr"),
    "optim.base_lr": _POSITIVE,
    "optim.min_lr": _NON_NEGATIVE,
    "optim.b1": _UNIT,
    "optim.b2": _UNIT,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.grad_clip": Range(0.0, note="0: off"),
    "optim.warmup_steps": _ints(0, "0: from warmup_epochs"),
    "optim.warmup_epochs": _NON_NEGATIVE,
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.model": _MESH_AXIS,
    "mesh.num_devices": _ints(0, "0: all devices"),
    "sharding.fsdp_min_size": _ints(0),
    "eval.batch_size": _ints(1),
    "eval.max_train": _ints(1),
    "eval.max_test": _ints(1),
    "eval.knn_k": _ints(1),
    "eval.knn_temperature": _POSITIVE,
    "eval.linear_epochs": _ints(1),
    "eval.diagnostics_every": _ints(0, "0: off"),
    "eval.diagnostics_examples": _ints(1),
    "faults.nan_at_step": _ints(0, "-1: off", also=(-1,)),
    "faults.pause_s": _NON_NEGATIVE,
    "student.drop_path": _UNIT,
    "student.mean": _PROBABILITY,
    "student.std": _POSITIVE,
    "model.drop_path": _UNIT,
    "model.mean": _PROBABILITY,
    "model.std": _POSITIVE,
    "teachers.feature.image_size": _ints(0, "0: the teacher's own"),
    "teachers.relation.image_size": _ints(0, "0: the teacher's own"),
    "loss.alpha": _NON_NEGATIVE,
    "loss.beta": _NON_NEGATIVE,
    "loss.smooth_l1_beta": _POSITIVE,
    "loss.relation_layers": _ints(1),
    "loss.label_smoothing": _UNIT,
    "masking.temperature": _POSITIVE,
    "masking.stage_starts": _UNIT,
    "masking.stage_ratios": _UNIT,
    "masking.drop_layers": _ints(1),
    "masking.drop_ratios": _UNIT,
    "mae.mask_ratio": Range(0.0, 1.0, open_lo=True),
    "mae.decoder_width": _ints(1),
    "mae.decoder_depth": _ints(1),
    "mae.decoder_heads": _ints(1),
    "finetune.layer_decay": Range(0.0, 1.0, open_lo=True, open_hi=False),
    "finetune.mixup": Range(0.0, note="the Beta parameter; 0: off"),
    "finetune.cutmix": Range(0.0, note="the Beta parameter; 0: off"),
    "finetune.mix_prob": _PROBABILITY,
    "finetune.switch_prob": _PROBABILITY,
}
MODE_RANGES: dict[str, dict[str, Range]] = {"evaluate": {"image_size": _ints(0, "0: the model's own")}}


def check_ranges(config) -> None:
    """A ConfigError naming the first field of ``RANGES`` (or ``MODE_RANGES``) outside its range, and it."""
    for name, allowed in {**RANGES, **MODE_RANGES.get(config.get("mode"), {})}.items():
        value = config
        for key in name.split("."):
            value = value.get(key) if hasattr(value, "get") else None
        if value is None:  # a field this mode lacks, or an unset optional one (loss.relation_layers)
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        _require(all(map(allowed.holds, values)), allowed.message(name, value))


def _check_model(mcfg, image_size: int, field: str) -> dict:
    arch = decode_variant(mcfg.variant) if mcfg.get("variant") else {}
    patch = mcfg.get("patch_size", arch.get("patch_size"))
    _require(patch is not None and patch > 0, f"{field}.patch_size: a positive patch size is required")
    _require(
        image_size % patch == 0, f"image_size={image_size} is not divisible by {field} patch size {patch}"
    )
    _in(mcfg.get("remat_policy", "none"), REMAT_POLICIES, f"{field}.remat_policy")
    width = mcfg.get("width", arch.get("width"))
    heads = mcfg.get("num_heads", arch.get("num_heads"))
    _require(width % heads == 0, f"{field}: width {width} is not divisible by num_heads {heads}")
    return {"patch_size": patch, "depth": mcfg.get("depth", arch.get("depth")), "num_heads": heads}


def validate(
    config,
    num_devices: int | None = None,
    check_teachers: bool = True,
    *,
    num_processes: int | None = None,
    deviceless: bool = False,
) -> None:
    """Checks every field that can be checked without data or model weights; raises ConfigError.

    ``check_teachers=False`` skips the teachers' files (for a chain that has yet to train them).
    ``deviceless``: the run is compiled here for ``num_devices`` devices on ``num_processes`` hosts it
    does not have: the data (which lives there) is not checked, teachers are described without a
    download (``models.io.describe_model``).
    """
    _in(config.mode, MODES, "config.mode")
    check_ranges(config)
    _require(config.total_steps > 0 or config.total_epochs > 0, "set total_steps or total_epochs (> 0)")
    visible = num_devices or jax.device_count()
    processes = num_processes or jax.process_count()
    subset = config.mesh.get("num_devices", 0)
    _require(
        isinstance(subset, int) and 0 <= subset <= visible,
        f"mesh.num_devices={subset!r}: expected 0 (all devices) or at most the {visible} visible",
    )
    _require(
        not subset or processes == 1,
        f"mesh.num_devices={subset}: a mesh over some of the devices is for single-process runs; set it to 0",
    )
    num_devices = subset or visible
    mesh = sharding.resolve_mesh_shape(config.mesh, num_devices)
    accum = config.get("grad_accum_steps", 1)  # its range is checked with the table above
    dp = mesh["data"] * mesh["fsdp"]
    _require(
        config.batch_size % (dp * accum) == 0,
        f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} (mesh.data x "
        f"mesh.fsdp) x grad_accum_steps={accum}; use a multiple of {dp * accum}",
    )
    _require(
        config.batch_size % processes == 0,
        f"batch_size={config.batch_size} is not divisible by the {processes} processes",
    )
    sh = config.get("sharding") or {}
    _in(sh.get("student", "replicated"), sharding.STRATEGIES, "sharding.student")
    _in(sh.get("teachers", "replicated"), sharding.STRATEGIES, "sharding.teachers")
    sharding.parse_rules(sh.get("rules", ()))
    _in(config.eval.pool, ("cls", "gap"), "eval.pool")
    _validate_diagnostics(config)
    _in(config.nonfinite_policy, ("skip", "stop"), "nonfinite_policy")
    _in(config.faults.get("pause_at", ""), ("", *signals.PHASES), "faults.pause_at")
    if not deviceless:
        from hybrid_distill_jax.data import validate_data_config

        validate_data_config(config.data)
    log_ids = config.data.get("log_example_ids", False)
    _require(isinstance(log_ids, bool), f"data.log_example_ids={log_ids!r}: expected True or False")

    if config.mode == "distill":
        from hybrid_distill_jax.tasks import distill  # lazy: the tasks import the trainer's pieces

        s = _check_model(config.student, config.image_size, "student")
        lc, mc = config.loss, config.masking
        _in(lc.feature_loss, FEATURE_LOSSES, "loss.feature_loss")
        _in(lc.relation_loss, RELATION_LOSSES, "loss.relation_loss")
        _in(lc.head, ("linear", "identity"), "loss.head")
        _require(lc.alpha + lc.beta > 0, "loss.alpha and loss.beta are both 0: nothing to distil")
        _in(mc.mode, masking.MODES, "masking.mode")
        _in(mc.selection, masking.SELECTIONS, "masking.selection")
        _in(mc.score_source, masking.SCORE_SOURCES, "masking.score_source")
        for role in ("feature", "relation"):
            _in(
                config.teachers[role].get("attn_impl", ""), ("", "xla", "cudnn"), f"teachers.{role}.attn_impl"
            )
        student = dict(s, image_size=config.image_size, dist_token=config.student.get("dist_token", False))
        archs = {"student": student}
        for role in distill.teacher_roles(config, s["depth"]) if check_teachers else ():
            tcfg = config.teachers[role]
            read = model_io.describe_model if deviceless else model_io.read_model_json
            meta = read(tcfg.checkpoint, f"teachers.{role}.checkpoint")
            archs[role] = {**meta["arch"], "image_size": tcfg.image_size or meta["input"]["image_size"]}
        distill.check_teachers(config, archs)
    else:
        if config.mode == "evaluate":
            return _validate_evaluate(config)
        if config.mode == "finetune":
            _validate_finetune(config, model_io.describe_model if deviceless else model_io.read_model_json)
        else:
            _check_model(config.model, config.image_size, "model")


def _validate_diagnostics(config) -> None:
    every = config.eval.get("diagnostics_every", 0)
    _require(
        every % config.log_every == 0,
        f"eval.diagnostics_every={every} must be a multiple of log_every={config.log_every}",
    )


def _validate_finetune(config, read_model_json) -> None:
    _in(config.model.pool, ("cls", "gap"), "model.pool")
    if config.init_from:
        meta = read_model_json(config.init_from, "init_from")
        patch = meta["arch"]["patch_size"]
        _require(
            config.image_size % patch == 0,
            f"image_size={config.image_size} is not divisible by init_from's patch size {patch}",
        )
    else:
        _check_model(config.model, config.image_size, "model")


def _validate_evaluate(config) -> None:
    meta = model_io.read_model_json(config.model_dir, "model_dir")
    size = config.image_size or meta["input"]["image_size"]
    patch = meta["arch"]["patch_size"]
    _require(size % patch == 0, f"image_size={size} is not divisible by model_dir's patch size {patch}")
    _require(
        config.eval.knn or config.eval.linear or config.eval.get("diagnostics", False),
        "eval.knn, eval.linear and eval.diagnostics are all off: nothing to evaluate",
    )


def resolve_steps(config, num_train_examples: int) -> tuple[int, int, int]:
    """(total_steps, warmup_steps, steps_per_epoch) from the step or epoch settings."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
    warmup = config.optim.warmup_steps or int(round(config.optim.warmup_epochs * steps_per_epoch))
    return total, min(warmup, total), steps_per_epoch


def check_workdir(workdir: str) -> str:
    """Creates the workdir, proves it is writable and locks it for this run (``workdir_lock``) before any
    training starts."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: not writable ({e.strerror})") from None
    workdir_lock.hold(workdir)
    return workdir

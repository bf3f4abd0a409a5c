"""Default configuration, up-front validation and the table of modes.

Recipes in ``configs/`` start from ``base_config(mode)`` and change what they need. ``validate``
runs before anything is built, so a wrong value fails in a second with one line naming the field.
``MODES`` says, for each ``config.mode``, what it adds to the defaults, what it checks and what runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import ml_collections

from hybrid_distill_jax import hardware, signals, teachers
from hybrid_distill_jax.checks import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Range,
    check_ranges,
    ints,
    one_of,
    require,
)
from hybrid_distill_jax.data.defaults import DATA_DEFAULTS
from hybrid_distill_jax.parallel import sharding
from hybrid_distill_jax.tasks import TASKS


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
    # Student EMA (DINO, RADIO): an fp32 exponential moving average of the trained parameters, in the train
    # state (sharded and checkpointed like them). decay 0 = off; warmup_steps ramps the decay linearly
    # from 0 (decay * min(1, step / warmup_steps)); export: what WORKDIR/export holds, 'ema', 'online', or
    # 'both' (the EMA weights there, the online ones in EXPORT_online). The final evaluation reports both.
    c.ema = ml_collections.ConfigDict(dict(decay=0.0, warmup_steps=0, export="ema"))
    c.nonfinite_policy = "skip"  # a NaN/Inf loss or gradient: 'skip' the update (counted) or 'stop' the run
    # A resume whose config changed what the run computes (objective, models, data, optimizer; beyond
    # train/run_config.MAY_CHANGE) is refused; True resumes the old checkpoint anyway.
    c.resume_with_changes = False
    # Fault injection, for tests of the guards: a NaN gradient at one step; a pause of pause_s seconds at
    # one phase of the run (signals.PHASES), during which tests send signals.
    c.faults = ml_collections.ConfigDict(dict(nan_at_step=-1, pause_at="", pause_s=0.0))

    if mode in MODES:
        MODES[mode].add_defaults(c)
    return c


_MESH_AXIS = ints(1, "-1: all remaining devices", also=(-1,))

# The range of every numeric field of base_config(mode), checked first by validate (config.data's are
# checked with the rest of the data section, by data.validate_data_config). Fields a mode lacks are skipped.
RANGES: dict[str, Range] = {
    "seed": ints(0),
    "image_size": ints(1),
    "batch_size": ints(1),
    "total_steps": ints(0, "0: from total_epochs"),
    "total_epochs": NON_NEGATIVE,
    "grad_accum_steps": ints(1),
    "log_every": ints(1),
    "checkpoint_every": ints(0, "0: only at the end"),
    "keep_checkpoints": ints(1),
    "optim.lr": Range(0.0, note="0: from base_lr"),
    "optim.base_lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.b1": UNIT,
    "optim.b2": UNIT,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip": Range(0.0, note="0: off"),
    "optim.warmup_steps": ints(0, "0: from warmup_epochs"),
    "optim.warmup_epochs": NON_NEGATIVE,
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.model": _MESH_AXIS,
    "mesh.num_devices": ints(0, "0: all devices"),
    "sharding.fsdp_min_size": ints(0),
    "eval.batch_size": ints(1),
    "eval.max_train": ints(1),
    "eval.max_test": ints(1),
    "eval.knn_k": ints(1),
    "eval.knn_temperature": POSITIVE,
    "eval.linear_epochs": ints(1),
    "eval.diagnostics_every": ints(0, "0: off"),
    "eval.diagnostics_examples": ints(1),
    "faults.nan_at_step": ints(0, "-1: off", also=(-1,)),
    "faults.pause_s": NON_NEGATIVE,
    "ema.decay": Range(0.0, 1.0, note="0: off"),
    "ema.warmup_steps": ints(0, "0: none"),
}
EMA_EXPORTS = ("ema", "online", "both")


def validate(
    config,
    num_devices: int | None = None,
    check_teachers: bool = True,
    *,
    num_processes: int | None = None,
    deviceless: bool = False,
    platform: str | None = None,
) -> None:
    """Checks every field that can be checked without data or model weights; raises ConfigError.

    ``check_teachers=False`` skips the teachers' files (for a chain that has yet to train them).
    ``deviceless``: the run is compiled here for ``num_devices`` devices on ``num_processes`` hosts it
    does not have: the data (which lives there) is not checked, teachers are described without a
    download (``teachers.describe``). ``platform`` is what the step is built for (``hardware.platform``'s
    names: a compile target's); by default this host's, whose backend is started here (a JAX_PLATFORMS
    this host cannot start is one line, naming it).
    """
    one_of(config.mode, VALIDATED_MODES, "config.mode")
    mode = MODES[config.mode]
    check_ranges(config, {**RANGES, **mode.ranges})
    one_of(config.ema.export, EMA_EXPORTS, "ema.export")
    require(config.total_steps > 0 or config.total_epochs > 0, "set total_steps or total_epochs (> 0)")
    platform = platform or hardware.platform()
    hardware.check_kernels(config, platform)
    visible = num_devices or jax.device_count()
    processes = num_processes or jax.process_count()
    subset = config.mesh.get("num_devices", 0)
    require(
        isinstance(subset, int) and 0 <= subset <= visible,
        f"mesh.num_devices={subset!r}: expected 0 (all devices) or at most the {visible} visible",
    )
    require(
        not subset or processes == 1,
        f"mesh.num_devices={subset}: a mesh over some of the devices is for single-process runs; set it to 0",
    )
    num_devices = subset or visible
    mesh = sharding.resolve_mesh_shape(config.mesh, num_devices)
    accum = config.get("grad_accum_steps", 1)  # its range is checked with the table above
    dp = mesh["data"] * mesh["fsdp"]
    require(
        config.batch_size % (dp * accum) == 0,
        f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} (mesh.data x "
        f"mesh.fsdp) x grad_accum_steps={accum}; use a multiple of {dp * accum}",
    )
    require(
        config.batch_size % processes == 0,
        f"batch_size={config.batch_size} is not divisible by the {processes} processes",
    )
    sh = config.get("sharding") or {}
    one_of(sh.get("student", "replicated"), sharding.STRATEGIES, "sharding.student")
    one_of(sh.get("teachers", "replicated"), sharding.STRATEGIES, "sharding.teachers")
    sharding.parse_rules(sh.get("rules", ()))
    one_of(config.eval.pool, ("cls", "gap"), "eval.pool")
    _validate_diagnostics(config)
    one_of(config.nonfinite_policy, ("skip", "stop"), "nonfinite_policy")
    one_of(config.get("resume_with_changes", False), (False, True), "resume_with_changes")
    one_of(config.faults.get("pause_at", ""), ("", *signals.PHASES), "faults.pause_at")
    if not deviceless:
        from hybrid_distill_jax.data import validate_data_config

        validate_data_config(config.data)
    log_ids = config.data.get("log_example_ids", False)
    require(isinstance(log_ids, bool), f"data.log_example_ids={log_ids!r}: expected True or False")

    mode.check_config(config, check_teachers=check_teachers, deviceless=deviceless)


def _validate_diagnostics(config) -> None:
    every = config.eval.get("diagnostics_every", 0)
    require(
        every % config.log_every == 0,
        f"eval.diagnostics_every={every} must be a multiple of log_every={config.log_every}",
    )


# ------------------------------------------------------------------------------------------------ modes


def _evaluate_defaults(c: ml_collections.ConfigDict) -> None:
    """k-NN + linear probe (+ attention diagnostics) of ``config.model_dir``."""
    c.model_dir = ""
    c.image_size = 0  # 0 = the model's own input resolution
    c.eval.diagnostics = True


def _check_evaluate(config, *, check_teachers: bool = True, deviceless: bool = False) -> None:
    """``config.model_dir``'s description against the config (the keywords are ``validate``'s; there
    are no teachers to skip)."""
    meta = teachers.describe(config.model_dir, "model_dir")
    size = config.image_size or meta["input"]["image_size"]
    patch = meta["arch"]["patch_size"]
    require(size % patch == 0, f"image_size={size} is not divisible by model_dir's patch size {patch}")
    require(
        config.eval.knn or config.eval.linear or config.eval.get("diagnostics", False),
        "eval.knn, eval.linear and eval.diagnostics are all off: nothing to evaluate",
    )


def _no_defaults(c: ml_collections.ConfigDict) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Mode:
    """One ``config.mode``.

    ``run``: what runs it, as ``'module:function'`` of a ``function(config, workdir)`` that the entry
    point (``hybrid_distill_jax.main``) imports; the runners live above this layer (the trainer, the
    experiments). ``add_defaults``: what ``base_config(mode)`` adds to or changes in the shared defaults.
    ``check_config``: what ``validate`` checks after the shared fields (the keywords of
    ``Task.check_config``); None for a chain of runs (demo, study), whose runner validates the config of
    each run it makes. ``ranges``: this mode's entries in place of ``RANGES``'.
    """

    run: str
    add_defaults: Callable[[ml_collections.ConfigDict], None] = _no_defaults
    check_config: Callable[..., None] | None = None
    ranges: Mapping[str, Range] = dataclasses.field(default_factory=dict)


# Every config.mode: each training task (hybrid_distill_jax.tasks, ``@register``), frozen-feature
# evaluation and the experiment chains.
MODES: dict[str, Mode] = {
    **{
        name: Mode("hybrid_distill_jax.train.trainer:run", task.add_defaults, task.check_config)
        for name, task in TASKS.items()
    },
    "evaluate": Mode(
        "hybrid_distill_jax.experiments.analyze:evaluate_model_dir",
        _evaluate_defaults,
        _check_evaluate,
        ranges={"image_size": ints(0, "0: the model's own")},
    ),
    "demo": Mode("hybrid_distill_jax.experiments.demo:run_demo"),
    "study": Mode("hybrid_distill_jax.experiments.study:run_study"),
    "study_agglomerative": Mode("hybrid_distill_jax.experiments.study_agglomerative:run_agglomerative"),
}
# The modes whose config is one run's: the ones validate checks.
VALIDATED_MODES = tuple(name for name, mode in MODES.items() if mode.check_config is not None)


def mode_of(config) -> Mode:
    """``config.mode``'s entry; an unknown mode is ``validate``'s one-line ConfigError."""
    if config.get("mode") not in MODES:
        one_of(config.get("mode"), VALIDATED_MODES, "config.mode")
    return MODES[config.mode]

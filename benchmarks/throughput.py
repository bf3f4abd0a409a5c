"""Throughput of one full Hybrid Distill training step, beside the PyTorch peer on the same card.

    python benchmarks/throughput.py                       # ViT-B/16 student + 2 ViT-B/16 teachers, 224 px,
                                                          # bf16, batch 256 per chip, keep 0.5 and 1.0, peers
    python benchmarks/throughput.py --quick               # fewer steps, one torch.compile run
    python benchmarks/throughput.py --data DIR --no-peer  # also end to end from DIR/train/<class>/*.jpg
    python benchmarks/throughput.py --preset l16 --fsdp -1 --remat_policy dots_saveable --no-peer
                                                          # ViT-L/16 from CLIP-L/14 (196 px) + MAE-L/16
    python benchmarks/throughput.py --config configs/hd_vitb16_deit_mae.py --batch 256 --quick
                                                          # a shipped recipe as shipped, every masking stage
    python benchmarks/throughput.py --config configs/hd_vitl16_clipl14_mae.py --batch 64 --stages first \
        --config.student.remat_policy=dots_saveable       # a recipe with overrides, its first stage only
    python benchmarks/throughput.py --quick --no-peer --keep 0.5 --profile DIR
                                                          # + device time per kind of op, from a trace
    python benchmarks/throughput.py --cpu-smoke           # tiny models on the CPU: proves the script runs

The step is the trainer's: the config, the task from ``tasks.build_task`` and the step from
``train.program.build_program`` (its ``jitted`` stage), on random-init teachers exported to a temporary
directory (or ``--teachers_dir``: ``DIR/<preset or recipe name>/<teacher name>/``) and loaded like real
ones. The config is either

- a preset (``--preset``, default b16): ``config_lib.base_config('distill')`` with the preset's
  architectures (teachers ``deit`` and ``mae``; ``clip`` and ``mae`` for l16) and the flags applied
  (``--keep``, ``--student_dtype``, ``--remat_policy``...), one fixed mask ratio per keep ratio; or
- a recipe (``--config configs/<recipe>.py[:ARG]``), read with its ``--config.FIELD=VALUE`` overrides by
  the trainer's command-line code: its student, teachers, loss terms, dtypes, image sizes, sharding and
  batch as shipped (``--batch`` sets the batch per chip instead; the recipe's ``batch_size`` is global),
  every stage of its masking schedule (``--stages`` picks some), the teachers its terms load random-init
  exports of the architectures it names, described without downloads
  (``FrozenTeacher.load(abstract=True)``: ``model.json``, or for an ``hf-hub:`` name a cached
  ``config.json`` or the known-teacher table). It also prints the
  schedule-weighted rate: each stage's step time weighted by its share of the run's steps. The preset
  flags do not apply to a recipe (override its fields instead) and there is no PyTorch peer for one.

It runs on a synthetic uint8 batch (images as the input pipeline ships them); with ``--data`` it then runs
the same compiled step fed by the product's input pipeline (``data.train_iterator`` + device prefetch)
and reports that end-to-end img/s beside the synthetic figure. ``--profile DIR`` traces
``--profile_steps`` more steps of each stage with ``jax.profiler`` into ``DIR/<run>-<stage>/`` and
summarises the device time per kind of op (``benchmarks/profile_summary.py``: GEMM, attention, other
fusions, copies/transposes, collectives, other) into the output.

Printed: which recipe or preset ran at which precision, then per stage (keep ratio) img/s (global and per
chip), step time, model FLOPs per image (analytic matmul count and XLA's cost analysis), MFU against a
bf16 matmul peak measured in the same run, peak device memory, and the ratio to each PyTorch peer
(``benchmarks/torch_peer.py``, run first, in subprocesses, before JAX takes the GPU memory). Imports
nothing but the standard library until it runs; TensorFlow only with ``--data``. Exit status: 0, 1 when
a loss is not finite, 2 for a bad command line, recipe, override or teacher.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import profile_summary

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEER_DEFAULT = os.path.join(HERE, "torch_peer.py")
# models.build.ATTN_IMPLS, spelled out: argparse refuses a typo before the teachers are exported, and
# JAX may only be imported once JAX_PLATFORMS is set (a test keeps the two equal).
ATTN_IMPLS = ("", "xla", "cudnn")

# name -> (student arch, image size, {teacher name: (arch, image size)}). The first teacher is the feature
# term's and scores the patches; the second is the relation term's (base_config's terms.feature and
# terms.relation), named as in the recipe of the same architectures.
PRESETS = {
    "b16": (
        dict(variant="B/16"),
        224,
        {"deit": (dict(variant="B/16"), 224), "mae": (dict(variant="B/16"), 224)},
    ),
    # CLIP ViT-L/14 (ln_pre, QuickGELU, projection) fed 196 px so its 14x14 grid matches the /16 student's.
    "l16": (
        dict(variant="L/16"),
        224,
        {
            "clip": (dict(variant="L/14", ln_pre=True, act="quick_gelu", proj_dim=768), 196),
            "mae": (dict(variant="L/16"), 224),
        },
    ),
    "tiny": (
        dict(variant="nano/8"),
        32,
        {"deit": (dict(variant="nano/8"), 32), "mae": (dict(variant="nano/8"), 32)},
    ),
}


# The preset flags: dest -> (default, what to override in a recipe instead).
PRESET_FLAGS = {
    "preset": ("b16", None),
    "keep": ("0.5,1.0", "--config.masking.stage_ratios=... (or --stages)"),
    "accum": (1, "--config.grad_accum_steps=N"),
    "fsdp": (1, "--config.mesh.fsdp=N (with mesh.data and sharding.*)"),
    "remat_policy": ("none", "--config.student.remat_policy=POLICY"),
    "student_dtype": ("bfloat16", "--config.student.dtype=DTYPE"),
    "teacher_dtype": ("bfloat16", "--config.teachers.NAME.dtype=DTYPE (each teacher)"),
    "teacher_attn_impl": ("", "--config.teachers.NAME.attn_impl=IMPL (each teacher)"),
    "student_attn_impl": ("", "--config.student.attn_impl=IMPL"),
    "teacher_fp8": (False, "--config.teachers.NAME.fp8=True (each teacher)"),
    "relation_on_kept": (False, "--config.terms.relation.teacher_on_kept=True"),
    "drop_path": (0.0, "--config.student.drop_path=RATE"),
}
_OVERRIDE = re.compile(r"--(no)?config\.\w")


def parse_args(argv=None):
    """The flags; every ``--config.FIELD=VALUE`` (or ``--noconfig.FIELD``) is kept, in order, in
    ``overrides``. A preset flag (``PRESET_FLAGS``) beside ``--config`` is an error naming the override."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument(
        "--config", default="", help="time this recipe (configs/<recipe>.py[:ARG]) as shipped, not a preset"
    )
    ap.add_argument(
        "--stages", default=None, help="--config: 'all' masking stages (default), 'first', or indices (0,2)"
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default b16")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="per-chip batch (global = batch x chips); default 256, or the recipe's global batch_size",
    )
    ap.add_argument("--keep", default=None, help="keep ratios (1 - mask ratio); default 0.5,1.0")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per stage (keep ratio)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    ap.add_argument(
        "--accum", type=int, default=None, help="grad_accum_steps (micro-batches per step); default 1"
    )
    ap.add_argument(
        "--fsdp", type=int, default=None, help="mesh.fsdp (-1: all chips); >1 splits params; default 1"
    )
    ap.add_argument(
        "--remat_policy", default=None, help="student.remat_policy (none, full, dots_saveable...)"
    )
    ap.add_argument(
        "--student_dtype", default=None, help="student compute dtype (params stay fp32); default bfloat16"
    )
    ap.add_argument("--teacher_dtype", default=None, help="default bfloat16")
    ap.add_argument(
        "--teacher_attn_impl",
        default=None,
        choices=ATTN_IMPLS,
        help="fused attention kernel of the frozen teachers (teachers.*.attn_impl); cudnn on NVIDIA GPUs",
    )
    ap.add_argument(
        "--student_attn_impl",
        default=None,
        choices=ATTN_IMPLS,
        help="fused attention kernel of the student blocks whose probabilities no term reads "
        "(student.attn_impl); cudnn on NVIDIA GPUs",
    )
    ap.add_argument(
        "--teacher_fp8",
        action="store_true",
        default=None,
        help="teachers.*.fp8=True: the teachers' block matmuls on float8 operands",
    )
    ap.add_argument(
        "--relation_on_kept",
        action="store_true",
        default=None,
        help="terms.relation.teacher_on_kept=True",
    )
    ap.add_argument(
        "--drop_path", type=float, default=None, help="student drop-path; default 0 (the peer has none)"
    )
    ap.add_argument("--peer", default=PEER_DEFAULT, help="path of torch_peer.py")
    ap.add_argument("--no-peer", dest="peer_run", action="store_false", help="skip the PyTorch peers")
    ap.add_argument("--peer-compile-keeps", default="0.5", help="keep ratios for the torch.compile peer")
    ap.add_argument("--matmul", type=int, default=8192, help="n of the n x n x n bf16 matmul peak probe")
    ap.add_argument("--quick", action="store_true", help="5 timed steps, 2 warm-up, 10 peer steps")
    ap.add_argument(
        "--cpu-smoke", dest="cpu_smoke", action="store_true", help="on the CPU, tiny models unless --config"
    )
    ap.add_argument(
        "--data", default="", help="also time the step fed by the input pipeline from this folder"
    )
    ap.add_argument("--json", default="", help="also write all results to this JSON file")
    ap.add_argument(
        "--teachers_dir", default="", help="export the random-init teachers here once and reuse them"
    )
    ap.add_argument(
        "--profile", default="", help="also trace each stage into DIR/<run>-<stage>/ and summarise it"
    )
    ap.add_argument("--profile_steps", type=int, default=3, help="steps traced per stage with --profile")
    a, overrides = ap.parse_known_args(argv)
    a.overrides = overrides
    unknown = [arg for arg in a.overrides if not _OVERRIDE.match(arg)]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if a.overrides and not a.config:
        ap.error(f"{a.overrides[0]}: --config.FIELD=VALUE overrides a recipe's field; pass --config too")
    if a.config:
        for dest, (_, instead) in PRESET_FLAGS.items():
            if getattr(a, dest) is not None:
                hint = f"override the recipe instead: {instead}" if instead else "pass one of them"
                ap.error(f"--{dest} sets up a preset, and --config times a recipe as shipped; {hint}")
    else:
        if a.stages is not None:
            ap.error("--stages picks among a recipe's masking stages; pass --config (a preset takes --keep)")
        for dest, (default, _) in PRESET_FLAGS.items():
            setattr(a, dest, default if getattr(a, dest) is None else getattr(a, dest))
    a.stages = a.stages or "all"
    a.keeps = [float(k) for k in a.keep.split(",") if k] if a.keep else []
    a.peer_compile = [float(k) for k in a.peer_compile_keeps.split(",") if k]
    a.peer_steps = 20
    if a.quick:
        a.steps, a.warmup, a.peer_steps = 5, 2, 10
    if a.cpu_smoke:
        a.steps, a.warmup, a.matmul, a.peer_run = 2, 1, 256, False
        if not a.config:
            a.preset, a.batch = "tiny", 8
    if not a.config:
        a.batch = a.batch or 256
    return a


# ---- PyTorch peers -----------------------------------------------------------------------------------
def run_peer(path: str, batch: int, keep: float, steps: int, compile_: bool) -> dict:
    cmd = [sys.executable, path, "--batch", str(batch), "--keep", str(keep), "--steps", str(steps)]
    cmd += ["--compile"] if compile_ else []
    name = "torch-compile" if compile_ else "torch-eager"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"impl": name, "keep": keep, "error": "timed out after 900 s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"impl": name, "keep": keep, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# ---- JAX -----------------------------------------------------------------------------------------------
def matmul_peak(n: int, reps: int = 20) -> float:
    """Measured bf16 matmul FLOP/s of one chip (n x n x n, fp32 accumulation), best of 3."""
    import jax
    import jax.numpy as jnp

    dev = jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16), dev)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n**0.5, dev)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, reps, lambda _, y: jnp.dot(y, w).astype(jnp.bfloat16), x)

    chain(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def export_teachers(models: dict, root: str) -> dict:
    """{name: directory}: each teacher ``models[name] = (ViT, mean, std)`` initialised at random and
    exported to ``root/name`` at its own image size, to be loaded back like a real teacher. An export
    already there with the same architecture and input description (``--teachers_dir``, shared by several
    invocations) is reused."""
    import jax
    import jax.numpy as jnp

    from hybrid_distill_jax.models import io as model_io
    from hybrid_distill_jax.models.vit import arch_dict

    out = {}
    for i, (name, (model, mean, std)) in enumerate(models.items()):
        directory = os.path.join(root, name)
        size = model.image_size
        wanted = {"arch": arch_dict(model), "input": {"image_size": size, "mean": mean, "std": std}}
        wanted = json.loads(json.dumps(wanted))  # tuples as lists, as model.json holds them
        path = os.path.join(directory, "model.json")
        if os.path.exists(path):
            with open(path) as f:
                meta = json.load(f)
            if {key: meta.get(key) for key in wanted} == wanted:
                out[name] = directory
                continue
        params = jax.jit(model.init)(jax.random.key(10 + i), jnp.zeros((1, size, size, 3), jnp.float32))
        out[name] = model_io.save_model(directory, model, params["params"], mean=mean, std=std)
        del params
    return out


def preset_config(args, root: str, chips: int):
    """(config, {teacher name: what the teacher is}) of ``--preset`` and the flags, its teachers
    exported."""
    import jax.numpy as jnp

    from hybrid_distill_jax.models.io import IMAGENET_MEAN, IMAGENET_STD
    from hybrid_distill_jax.models.vit import make_vit

    archs = {name: {**arch, "image_size": size} for name, (arch, size) in PRESETS[args.preset][2].items()}
    models = {
        name: (make_vit(arch, dtype=jnp.bfloat16), IMAGENET_MEAN, IMAGENET_STD)
        for name, arch in archs.items()
    }
    teachers = export_teachers(models, os.path.join(root, args.preset))
    named = {name: ", ".join(f"{k}={v}" for k, v in arch.items()) for name, arch in archs.items()}
    return make_config(args, teachers, args.batch * chips), named


def load_recipe(spec: str, overrides: list[str]):
    """The config of the recipe ``spec`` (``PATH[:ARG]``) with its ``--config.FIELD=VALUE`` overrides, read
    by the command line's config code (``config_file.parse_flags_or_exit``): a bad file, field or value is one
    line on stderr and exit status 2."""
    from absl import flags
    from ml_collections import config_flags

    from hybrid_distill_jax.config_file import parse_flags_or_exit

    argv = [sys.argv[0], f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "the recipe", flag_values=flag_values, sys_argv=argv)
    parse_flags_or_exit(argv, flag_values)
    return flag_values.config


def recipe_config(args, config, root: str, chips: int):
    """(config, {teacher name: its checkpoint}) of ``--config``: the recipe ``config`` (``load_recipe``) with
    ``--batch`` (per chip) when given, and each teacher it loads replaced by a random-init export of the
    architecture it names, described without reading weights or downloading
    (``FrozenTeacher.load(abstract=True)``)."""
    import jax.numpy as jnp

    from hybrid_distill_jax.models.vit import arch_dict, make_vit
    from hybrid_distill_jax.tasks import build_task

    if args.batch:
        config.batch_size = args.batch * chips
    described = build_task(config, num_classes=0, abstract=True).teachers  # the teachers the terms load
    named = {name: str(config.teachers[name].checkpoint) for name in described}
    models = {  # the plain architecture: no fp8 scales, the attention kernel chosen again at load
        name: (make_vit(arch_dict(t.model), dtype=jnp.bfloat16), t.mean, t.std)
        for name, t in described.items()
    }
    for name, directory in export_teachers(models, os.path.join(root, config.name)).items():
        config.teachers[name].checkpoint = directory
    return config, named


def make_config(args, teachers: dict, global_batch: int):
    """The run's config: ``config_lib.base_config('distill')`` with the preset and the flags applied."""
    import ml_collections

    from hybrid_distill_jax.config_lib import base_config
    from hybrid_distill_jax.teachers import teacher_config

    student, image_size, archs = PRESETS[args.preset]
    c = base_config("distill")
    c.name = args.preset
    c.image_size = image_size
    c.batch_size = global_batch
    c.total_steps = 10_000
    c.optim.warmup_steps = 100
    c.grad_accum_steps = args.accum
    c.student.update(
        dict(
            **student,
            drop_path=args.drop_path,
            dtype=args.student_dtype,
            param_dtype="float32",
            remat_policy=args.remat_policy,
            attn_impl=args.student_attn_impl,
        )
    )
    c.teachers = ml_collections.ConfigDict(
        {
            name: teacher_config(
                teachers[name],
                dtype=args.teacher_dtype,
                image_size=size,
                attn_impl=args.teacher_attn_impl,
                fp8=args.teacher_fp8,
            )
            for name, (_, size) in archs.items()
        }
    )
    feature, relation = archs  # the preset's two teachers, in that order
    c.terms.feature.teacher = c.masking.score_teacher = feature
    c.terms.relation.teacher = relation
    c.terms.relation.teacher_on_kept = args.relation_on_kept
    c.masking.update(dict(mode="over_training", selection="gumbel", stage_starts=(0.0,), stage_ratios=(0.0,)))
    c.mesh.update(dict(data=1 if args.fsdp == -1 else -1, fsdp=args.fsdp, model=1))
    strategy = "fsdp" if args.fsdp != 1 else "replicated"
    c.sharding.update(dict(student=strategy, teachers=strategy))
    return c


def data_source(path: str) -> dict:
    """``config.data`` fields for ``--data``: a folder root (``train/<class>/*.jpg``) or a prepared TFDS
    dataset (a TFDS name, or its directory)."""
    if os.path.isdir(os.path.join(path, "train")):
        return dict(name="folder", data_dir=path, train_split="train", eval_split="train")
    return dict(name=path, data_dir=None, train_split="train", eval_split="train")


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def peak_memory_gb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else None


def host_batches(config, args):
    """The product's training input pipeline for ``--data`` (TensorFlow is imported here, not before)."""
    import jax

    from hybrid_distill_jax.data import train_iterator

    return train_iterator(
        config.data,
        image_size=config.image_size,
        global_batch=config.batch_size,
        seed=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def timed_steps(compiled, state, frozen, batches, warmup: int, steps: int):
    """(state, loss, seconds per step) of ``steps`` steps after ``warmup``, fed from ``batches``."""
    import jax

    for _ in range(warmup):
        state, metrics = compiled(state, frozen, next(batches))
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, next(batches))
    loss = float(metrics["loss"])  # waits for the last step
    return state, loss, (time.perf_counter() - t0) / steps


def stage_shares(task, total_steps: int, samples: int = 10_000) -> dict:
    """{stage: its share of the run's steps} under the masking schedule, from ``task.stage`` at (at most)
    ``samples`` evenly spaced steps."""
    steps = range(0, total_steps, max(1, total_steps // samples))
    counts = collections.Counter(task.stage(step, total_steps) for step in steps)
    return {stage: counts[stage] / len(steps) for stage in task.stages(total_steps)}


def precision(config, task) -> dict:
    """The dtypes the step computes in and the teachers' attention kernels."""
    return {
        "student": config.student.dtype,
        "student_params": config.student.param_dtype,
        "student_attn_impl": task.student.attn_impl or "xla",
        "teachers": {name: config.teachers[name].dtype for name in task.teachers},
        "teacher_attn_impl": {name: t.model.attn_impl or "xla" for name, t in task.teachers.items()},
        "teacher_fp8": {name: t.model.fp8 for name, t in task.teachers.items()},
    }


def describe_run(args, config, task, named: dict, chips: int, shares: dict | None) -> str:
    """One line: which recipe (or preset), at which precision, batch and masking stages."""
    from hybrid_distill_jax.compile import stage_label

    if args.config:
        overrides = f", overrides {' '.join(args.overrides)}" if args.overrides else ""
        what = f"recipe {config.name} ({args.config}{overrides})"
    else:
        what = f"preset {args.preset} (config_lib.base_config('distill') + flags)"
    s, p = config.student, precision(config, task)
    teachers = ", ".join(
        f"{name} {named[name]} at {t.image_size} px in {p['teachers'][name]} (attention: "
        f"{p['teacher_attn_impl'][name]}{', fp8 matmuls' if p['teacher_fp8'][name] else ''})"
        for name, t in task.teachers.items()
    )
    stages = ""
    if shares:
        stages = "; masking stages " + ", ".join(
            f"{stage_label(task, stage)} ({share:.0%} of the run)" for stage, share in shares.items()
        )
    return (
        f"# {what}: student {s.variant} at {config.image_size} px computes in {s.dtype}, params in "
        f"{s.param_dtype}, attention {p['student_attn_impl']}, remat {s.remat_policy}, drop_path "
        f"{s.drop_path}; teachers (random init of these architectures): {teachers}; batch "
        f"{config.batch_size // chips} per chip x {chips} "
        f"chip(s); grad_accum_steps {config.grad_accum_steps}{stages}"
    )


def run_jax(args, recipe=None) -> dict:
    """Builds the step of the preset (or of ``recipe``, ``--config`` loaded), times every stage, and
    returns the results (``--profile``: with each stage's profile summary)."""
    import itertools

    import jax
    import numpy as np

    from hybrid_distill_jax import config_lib, hardware, masking
    from hybrid_distill_jax.compile import IMAGENET_TRAIN_EXAMPLES, select_stages, stage_label
    from hybrid_distill_jax.data.prefetch import prefetch_to_device, to_devices
    from hybrid_distill_jax.optim import resolve_steps
    from hybrid_distill_jax.parallel import sharding
    from hybrid_distill_jax.tasks import build_task
    from hybrid_distill_jax.train.program import build_program, compiled_flops

    hardware.platform()  # a JAX_PLATFORMS this host cannot start: one line (a ConfigError)
    chips = jax.device_count()
    kind = jax.devices()[0].device_kind
    print(f"# jax {jax.__version__} on {chips} x {kind} ({jax.default_backend()})", flush=True)
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.teachers_dir or scratch
        if recipe is None:
            config, named = preset_config(args, root, chips)
        else:
            config, named = recipe_config(args, recipe, root, chips)
        if args.data:
            config.data.update(data_source(args.data))
        config_lib.validate(config, deviceless=not args.data)  # the data fields need TensorFlow to check
        task = build_task(config, num_classes=0)
    print(f"# teachers ready (exported or reused) and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    peak = matmul_peak(args.matmul)
    print(f"# measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s per chip (n={args.matmul})", flush=True)
    total_steps, warmup_steps, _ = resolve_steps(config, IMAGENET_TRAIN_EXAMPLES)
    global_batch = config.batch_size
    n = task.num_patches
    if args.config:
        shares = stage_shares(task, total_steps)
        stages = [(stage, None) for stage in select_stages(tuple(shares), args.stages)]
    else:
        shares = None
        stages = [(masking.keep_count(n, 1.0 - keep), keep) for keep in args.keeps]
    print(describe_run(args, config, task, named, chips, shares), flush=True)
    mesh = sharding.make_mesh(config.mesh)
    program = build_program(config, task, mesh, total_steps=total_steps, warmup_steps=warmup_steps)
    frozen = jax.device_put(task.frozen, program.frozen_shardings)
    batch_sh = program.batch_sharding
    size = config.image_size
    rng = np.random.RandomState(0)
    synthetic = to_devices(  # uint8, as the input pipeline ships images
        {
            "image": rng.randint(0, 256, (global_batch, size, size, 3), dtype=np.uint8),
            "label": np.zeros((global_batch,), np.int32),
        },
        batch_sh,
    )
    data = None
    if args.data:
        data = prefetch_to_device(host_batches(config, args), lambda b: to_devices(b, batch_sh))
    accumulating = config.grad_accum_steps > 1
    results = []
    for stage, keep in stages:
        label = stage_label(task, stage)
        kept = task.stage_metrics(stage)["keep"]
        state = program.jitted_init()(jax.random.key(0))
        jitted = program.jitted(stage)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, frozen, synthetic).compile()
        compile_s = time.perf_counter() - t0
        state, loss, dt = timed_steps(
            compiled, state, frozen, itertools.repeat(synthetic), args.warmup, args.steps
        )
        profile = None
        if args.profile:
            run_dir = os.path.join(args.profile, config.name + "-" + re.sub(r"[^\w.-]+", "", label))
            step = lambda s, c=compiled: c(s, frozen, synthetic)  # noqa: E731
            state, profile = profile_summary.profile_steps(
                step, state, args.profile_steps, run_dir, compiled.as_text()
            )
            print("\n".join(f"# profile {label}: {line}" for line in profile_summary.describe(profile)))
        e2e = None
        if data is not None:
            state, e2e_loss, e2e_dt = timed_steps(compiled, state, frozen, data, args.warmup, args.steps)
            e2e = dict(e2e_img_s=round(global_batch / e2e_dt, 1), e2e_loss=e2e_loss)
        analytic = task.flops_per_example(stage)
        xla = None if accumulating else compiled_flops(compiled)  # XLA counts a scan body once
        img_s = global_batch / dt
        results.append(
            dict(
                impl="jax",
                recipe=config.name if args.config else None,
                preset=None if args.config else args.preset,
                stage=label,
                keep=keep if keep is not None else round(kept / n, 4),
                kept_tokens=kept,
                batch_per_chip=global_batch // chips,
                chips=chips,
                precision=precision(config, task),
                step_s=round(dt, 4),
                img_s=round(img_s, 1),
                img_s_per_chip=round(img_s / chips, 1),
                gflop_per_img=sig(analytic["total"] / 1e9),
                gflop_per_img_parts={k2: sig(v / 1e9) for k2, v in analytic.items() if k2 != "total"},
                xla_gflop_per_img=sig(xla / (global_batch / chips) / 1e9) if xla else None,
                mfu=round(analytic["total"] * img_s / (peak * chips), 4),
                peak_gb=peak_memory_gb(),
                compile_s=round(compile_s, 1),
                loss=loss,
                finite=bool(np.isfinite(loss)),
                **(e2e or {}),
                **({"profile": profile} if profile else {}),
            )
        )
        print(json.dumps(results[-1]), flush=True)
        del state, compiled, jitted
    out = {
        "device": kind,
        "chips": chips,
        "matmul_peak_tflops": round(peak / 1e12, 1),
        "recipe": config.name if args.config else None,
        "config": args.config or None,
        "overrides": args.overrides,
        "preset": None if args.config else args.preset,
        "precision": precision(config, task),
        "runs": results,
    }
    if shares:
        shares = {stage_label(task, stage): share for stage, share in shares.items()}
        out["schedule"] = schedule_rate(shares, results, global_batch / chips)
    return out


def schedule_rate(shares: dict, results: list, batch_per_chip: float) -> dict:
    """A recipe's img/s per chip over its whole masking schedule: the stages' step times weighted by their
    shares of the run's steps (``shares``: {stage label: share}); None unless every stage was timed."""
    step_s = {r["stage"]: r["step_s"] for r in results}
    mean_step_s = (
        sum(share * step_s[label] for label, share in shares.items())
        if shares.keys() <= step_s.keys()
        else None
    )
    return {
        "shares": shares,
        "img_s_per_chip": round(batch_per_chip / mean_step_s, 1) if mean_step_s else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, REPO)
    from hybrid_distill_jax.errors import ConfigError

    recipe = load_recipe(args.config, args.overrides) if args.config else None  # a bad one: exit status 2
    peers = []
    if args.peer_run:  # before JAX touches the GPU: the peers need its memory
        if not os.path.exists(args.peer):
            print(f"# no peer at {args.peer} (or pass --no-peer)")
        elif args.preset != "b16":
            print("# the PyTorch peer is ViT-B/16 of --preset b16 only: no peer for this preset or recipe")
        else:
            for keep in args.keeps:
                peers.append(run_peer(args.peer, args.batch, keep, args.peer_steps, compile_=False))
                print(json.dumps(peers[-1]), flush=True)
                if keep in args.peer_compile:
                    peers.append(run_peer(args.peer, args.batch, keep, args.peer_steps, compile_=True))
                    print(json.dumps(peers[-1]), flush=True)
    try:
        out = run_jax(args, recipe)
    except ConfigError as e:  # a recipe, an override or a teacher it names
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["peers"] = peers

    print(
        "\n| impl | stage | keep | img/s/chip | step s | GFLOP/img (analytic / XLA) | MFU | peak GiB "
        "| vs eager | vs compile | end-to-end img/s/chip |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out["runs"]:
        ratios = []
        for impl in ("torch-eager", "torch-compile"):
            peer = next((p for p in peers if p.get("impl") == impl and p.get("keep") == r["keep"]), None)
            ok = peer and "img_s" in peer
            ratios.append(f"{r['img_s_per_chip'] / peer['img_s']:.2f}x" if ok else "-")
        print(
            f"| jax {r['recipe'] or r['preset']} | {r['stage']} | {r['keep']} | {r['img_s_per_chip']} | "
            f"{r['step_s']} | {r['gflop_per_img']} / {r['xla_gflop_per_img']} | {r['mfu']:.1%} | "
            f"{r['peak_gb']} | {ratios[0]} | {ratios[1]} | "
            f"{round(r['e2e_img_s'] / r['chips'], 1) if 'e2e_img_s' in r else '-'} |"
        )
    for p in peers:
        shown = p.get("img_s", p.get("error"))
        print(
            f"| {p['impl']} | | {p['keep']} | {shown} | {p.get('step_s', '-')} | | | "
            f"{p.get('peak_gb', '-')} | | | |"
        )
    schedule = out.get("schedule")
    if schedule:
        rate = schedule["img_s_per_chip"]
        print(
            f"\n# {out['recipe']} over its masking schedule (stages weighted by their share of the run's "
            + (f"steps): {rate} img/s/chip" if rate else "steps): needs every stage timed (--stages all)")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r["finite"] for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

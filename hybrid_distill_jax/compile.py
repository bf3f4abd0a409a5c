"""Compile a recipe's training step for hardware this host does not have, and report whether it fits.

    python -m hybrid_distill_jax.compile --config configs/hd_vitl16_clipl14_mae.py --target v5e:16x16 \\
        --config.mesh.fsdp=-1 --config.mesh.data=1 --config.sharding.student=fsdp
    python -m hybrid_distill_jax.compile --config configs/hd_vitb16_deit_mae.py --target h200 --hosts 2
    python -m hybrid_distill_jax.compile --config ... --target v5p:4x4x4 --num_slices 2 --json report.json

``--target`` is a TPU slice (``v4:2x2x2``, ``v5e:16x16``, ``v5p:2x2x1``, ``v6e:4x4``, ``tpu7x:2x2x1``)
or a GPU card (``h100-sxm``, ``h200``, or a ``.txtpb`` device description) with ``--gpus_per_host`` and
``--hosts`` (``hybrid_distill_jax.aot.targets``). Needs the compilers: ``pip install -e '.[aot]'``.

The step compiled is the trainer's own (``train.program.build_program``), for every masking stage of
the run, on the target's devices and mesh, with the config validated for the target's device and
process counts. Teachers are abstract: their architecture comes from ``model.json`` or, for an
``hf-hub:`` name, from a cached ``config.json`` or the known-teacher table; no weights are read or
downloaded, no data is touched, no accelerator is used. Per stage it prints XLA's per-device memory
(arguments, outputs, temporaries, peak) against the device's memory, FLOPs per step (XLA's where it
reports them, the analytic matmul count otherwise), the compile time and, for GPU targets, the kernel
plan (GEMM calls by operand dtype, fused-attention calls, collectives, the largest buffers).

Exit status: 0 when every stage fits, 1 when one does not (one line names the stage and the bytes),
2 for a bad config, target or flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time

from absl import flags
from ml_collections import config_flags

from hybrid_distill_jax import errors
from hybrid_distill_jax.errors import ConfigError

IMAGENET_TRAIN_EXAMPLES = 1_281_167
FLAGS = flags.FlagValues()


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)
    flags.DEFINE_string(
        "target", None, "TPU slice (v5e:16x16, ...) or GPU card (h100-sxm, h200).", flag_values=fv
    )
    flags.mark_flag_as_required("target", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "TPU targets: number of slices (multi-slice).", flag_values=fv)
    flags.DEFINE_integer("gpus_per_host", 8, "GPU targets: GPUs on each host.", flag_values=fv)
    flags.DEFINE_integer("hosts", 1, "GPU targets: number of hosts.", flag_values=fv)
    flags.DEFINE_string(
        "stages",
        "all",
        "'all' masking stages, 'first' only, or comma-separated stage indices.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "train_examples",
        IMAGENET_TRAIN_EXAMPLES,
        "Training-set size for an epoch-based run's step count (the data is not read; ImageNet-1k's).",
        flag_values=fv,
    )
    flags.DEFINE_integer("num_classes", 1000, "Classes of a supervised/finetune task's head.", flag_values=fv)
    flags.DEFINE_boolean(
        "triton_gemm",
        False,
        "GPU targets: let XLA emit Triton GEMMs. Off by default: without a device XLA cannot autotune "
        "them, and as cuBLAS calls every GEMM is countable in the kernel plan.",
        flag_values=fv,
    )
    flags.DEFINE_string("json", None, "Also write the report as JSON to this file.", flag_values=fv)


define_flags(FLAGS)


@dataclasses.dataclass
class StageReport:
    """One stage's compiled program, per device. A program the compiler itself refused for want of
    memory (TPU) has only ``peak_bytes``, the requirement its error states, and ``compiler_error``."""

    stage: str
    peak_bytes: int
    fits: bool
    compile_s: float
    analytic_flops_per_device: float | None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    xla_flops_per_device: float | None = None
    kernels: dict | None = None
    compiler_error: str | None = None
    largest_batch_estimate: int | None = None  # global; see ``largest_batch``


def _prepare_environment(argv: list[str]) -> None:
    """Sets the target's compiler up before anything imports JAX (the config file does)."""
    from hybrid_distill_jax.aot import targets

    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), None)
    if name is None and "--target" in argv[:-1]:
        name = argv[argv.index("--target") + 1]
    if name is None:
        return  # absl reports the missing flag
    try:
        platform = targets.platform_of(name)
        if platform == "cuda":
            targets.gpu_spec(name)  # a damaged description: one line in a second, not a crash in XLA
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    triton = any(a in ("--triton_gemm", "--triton_gemm=true", "--triton_gemm=True") for a in argv)
    targets.prepare_environment(platform, triton_gemm=triton)


def deviceless_program(config, target, *, train_examples: int, num_classes: int):
    """(program, every stage of the run): the trainer's step for ``target``'s devices, abstract teachers,
    the config validated for the target's device and process counts."""
    from hybrid_distill_jax import config_lib, tasks
    from hybrid_distill_jax.optim import resolve_steps
    from hybrid_distill_jax.parallel import sharding
    from hybrid_distill_jax.train.program import build_program

    config_lib.validate(
        config,
        num_devices=target.num_devices,
        num_processes=target.num_processes,
        deviceless=True,
        platform=target.platform,
    )
    total_steps, warmup_steps, _ = resolve_steps(config, train_examples)
    mesh = sharding.make_mesh(config.mesh, devices=sharding_devices(config.mesh, target))
    platform = "gpu" if target.platform == "cuda" else target.platform
    task = tasks.build_task(config, num_classes, abstract=True, platform=platform)
    program = build_program(config, task, mesh, total_steps=total_steps, warmup_steps=warmup_steps)
    return program, task.stages(total_steps)


def compile_stage(program, stage, target) -> StageReport:
    """Compiles ``program``'s step of ``stage`` and reads the compiled object's memory and FLOPs."""
    import jax

    from hybrid_distill_jax.aot import kernels
    from hybrid_distill_jax.train.program import compiled_flops

    task = program.task
    analytic = task.flops_per_example(stage)
    per_device_batch = program.global_batch / program.mesh.devices.size
    analytic_per_device = analytic["total"] * per_device_batch if analytic else None
    t0 = time.perf_counter()
    try:
        compiled = program.lower(stage).compile()
    except jax.errors.JaxRuntimeError as e:
        required = required_bytes(str(e))
        if required is None:
            raise
        resident = input_bytes(program)
        return StageReport(
            stage=stage_label(task, stage),
            peak_bytes=required + resident,
            fits=False,
            compile_s=round(time.perf_counter() - t0, 1),
            analytic_flops_per_device=analytic_per_device,
            compiler_error=str(e).strip().splitlines()[0][:300],
            largest_batch_estimate=largest_batch(program, resident, required, target.memory_bytes),
        )
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    peak = int(memory.peak_memory_in_bytes) or (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    accumulating = task.config.get("grad_accum_steps", 1) > 1  # XLA counts a loop body once
    return StageReport(
        stage=stage_label(task, stage),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        peak_bytes=peak,
        fits=peak <= target.memory_bytes,
        xla_flops_per_device=None if accumulating else compiled_flops(compiled),
        analytic_flops_per_device=analytic_per_device,
        compile_s=round(seconds, 1),
        kernels=kernels.plan(compiled.as_text()) if target.platform == "cuda" else None,
        largest_batch_estimate=largest_batch(
            program,
            memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes,
            memory.temp_size_in_bytes,
            target.memory_bytes,
        ),
    )


def input_bytes(program) -> int:
    """Bytes per device of the step's inputs (state, teachers, batch), from their shardings."""
    import math

    import jax
    import numpy as np

    inputs = jax.tree.leaves(program.abstract_inputs(program.task.frozen))
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in inputs)


def largest_batch(program, resident_bytes: int, temp_bytes: int, usable_bytes: int) -> int | None:
    """The largest global batch whose step would fit, assuming the temporaries grow in proportion to the
    batch and the resident bytes (parameters, optimizer state, teachers) do not: an estimate from one
    compile, rounded down to a multiple of the data-parallel size times the micro-batch count."""
    mesh = program.mesh.shape
    data_parallel = mesh.get("data", 1) * mesh.get("fsdp", 1)
    per_replica = program.global_batch // data_parallel
    if temp_bytes <= 0 or per_replica <= 0 or resident_bytes >= usable_bytes:
        return None
    step = data_parallel * program.task.config.get("grad_accum_steps", 1)
    per_example = temp_bytes / per_replica
    batch = int((usable_bytes - resident_bytes) / per_example) * data_parallel
    return batch // step * step


def compile_stages(config, target, *, stages: str = "all", train_examples: int, num_classes: int) -> list:
    """Compiles the step of every selected stage for ``target``; one StageReport each."""
    import jax

    program, all_stages = deviceless_program(
        config, target, train_examples=train_examples, num_classes=num_classes
    )
    reports = []
    for stage in select_stages(all_stages, stages):
        reports.append(compile_stage(program, stage, target))
        jax.clear_caches()  # the executables of a large recipe hold GBs of host memory
    return reports


_REQUIRED = re.compile(r"RESOURCE_EXHAUSTED: .*?required for [^(]*\(([0-9.]+)([KMGT]?)\)")


def required_bytes(message: str) -> int | None:
    """The bytes a compiler's out-of-memory error says the program needs ('... (95.17G) exceeds ...')."""
    match = _REQUIRED.search(message)
    if match is None:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def sharding_devices(mesh_cfg, target) -> list:
    """The target's devices, or its first ``mesh.num_devices`` (a single-host target only)."""
    n = mesh_cfg.get("num_devices", 0) or 0
    return list(target.devices[:n] if n else target.devices)


def select_stages(all_stages: tuple, which: str) -> tuple:
    if which == "all":
        return all_stages
    if which == "first":
        return all_stages[:1]
    try:
        picked = [all_stages[int(i)] for i in which.split(",")]
    except (ValueError, IndexError):
        raise ConfigError(
            f"--stages={which!r}: expected 'all', 'first' or indices below {len(all_stages)}, e.g. 0,2"
        ) from None
    return tuple(picked)


def stage_label(task, stage) -> str:
    described = task.stage_metrics(stage)
    return ", ".join(f"{k}={v}" for k, v in described.items()) or str(stage)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def mesh_shape(config, target) -> dict[str, int]:
    from hybrid_distill_jax.parallel import sharding

    return sharding.resolve_mesh_shape(config.mesh, len(sharding_devices(config.mesh, target)))


def memory_note(target) -> str:
    if target.memory_bytes == target.device_memory_bytes:
        return f"{gib(target.memory_bytes)} GiB each"
    return (
        f"{gib(target.device_memory_bytes)} GiB each, {gib(target.memory_bytes)} usable at "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={target.memory_bytes / target.device_memory_bytes:.2f}"
    )


def print_report(config, target, reports, print_fn=print) -> None:
    trained = config.get("student") or config.get("model")
    print_fn(
        f"# {config.name} on {target.name}: {target.num_devices} x {target.device_kind} "
        f"({memory_note(target)}), {target.num_processes} host(s); global batch "
        f"{config.batch_size}; mesh {mesh_shape(config, target)}; sharding student={config.sharding.student} "
        f"teachers={config.sharding.teachers}; trained model computes in {trained.dtype}"
    )
    print_fn("# a compile, not a run: XLA's buffers per device; runtime workspaces (cuDNN) are not included")
    print_fn(
        "\n| stage | args GiB | out GiB | temp GiB | peak GiB | of GiB | fits | largest batch (est.) "
        "| TFLOP/step/device (XLA / analytic) | compile s |"
    )
    print_fn("|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        xla = f"{r.xla_flops_per_device / 1e12:.3g}" if r.xla_flops_per_device else "-"
        ana = f"{r.analytic_flops_per_device / 1e12:.3g}" if r.analytic_flops_per_device else "-"
        print_fn(
            f"| {r.stage} | {gib(r.argument_bytes)} | {gib(r.output_bytes)} | {gib(r.temp_bytes)} | "
            f"{gib(r.peak_bytes)} | {gib(target.memory_bytes)} | {'fits' if r.fits else 'DOES NOT FIT'} | "
            f"{r.largest_batch_estimate or '-'} | {xla} / {ana} | {r.compile_s} |"
        )
    for r in reports:
        if r.compiler_error:
            print_fn(f"# {r.stage}: the compiler refused it: {r.compiler_error}")
    for r in reports:
        if r.kernels:
            from hybrid_distill_jax.aot import kernels

            print_fn(f"\n## kernel plan, {r.stage}")
            for line in kernels.describe(r.kernels):
                print_fn(line)


def report_dict(config, target, reports) -> dict:
    return {
        "config": config.name,
        "target": target.name,
        "platform": target.platform,
        "device_kind": target.device_kind,
        "num_devices": target.num_devices,
        "num_processes": target.num_processes,
        "device_memory_bytes": target.device_memory_bytes,
        "usable_memory_bytes": target.memory_bytes,
        "global_batch": config.batch_size,
        "mesh": mesh_shape(config, target),
        "stages": [dataclasses.asdict(r) for r in reports],
        "fits": all(r.fits for r in reports),
    }


def run(config, target_name: str, **options) -> int:
    """Compiles, prints the table, writes ``json``; 1 when a stage does not fit."""
    from hybrid_distill_jax.aot import targets

    json_path = options.pop("json", None)
    slicing = {k: options.pop(k) for k in ("num_slices", "gpus_per_host", "hosts")}
    target = targets.describe(target_name, **slicing)
    reports = compile_stages(config, target, **options)
    print_report(config, target, reports)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report_dict(config, target, reports), f, indent=2)
    too_big = [r for r in reports if not r.fits]
    for r in too_big:
        print(
            f"error: stage {r.stage} does not fit on {target.name}: needs {r.peak_bytes:,} bytes "
            f"({gib(r.peak_bytes)} GiB) per device, {target.memory_bytes:,} ({gib(target.memory_bytes)} GiB) "
            "available",
            file=sys.stderr,
        )
    return 1 if too_big else 0


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    options = dict(
        num_slices=FLAGS.num_slices,
        gpus_per_host=FLAGS.gpus_per_host,
        hosts=FLAGS.hosts,
        stages=FLAGS.stages,
        train_examples=FLAGS.train_examples,
        num_classes=FLAGS.num_classes,
        json=FLAGS.json,
    )
    status = 0

    def go():
        nonlocal status
        status = run(FLAGS.config, FLAGS.target, **options)

    return errors.exit_status_of(go) or status


def cli() -> None:
    from hybrid_distill_jax.config_file import parse_flags_or_exit

    _prepare_environment(sys.argv)
    sys.exit(main(parse_flags_or_exit(sys.argv, FLAGS)))


if __name__ == "__main__":
    cli()

"""Deviceless compiles: the trainer's step compiled on this CPU for TPU slices (libtpu) and NVIDIA GPUs
(the CUDA plugin), with teachers described by ``model.json`` alone (no weights exist in these tests).

Each target runs in its own process (``python -m hybrid_distill_jax.compile``), as a user runs it: the
compiler is chosen before JAX starts. The in-process test compiles for a TPU topology too; libtpu is
loaded beside the test session's CPU devices.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ARCH, REPO

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="TPU targets need libtpu: make install-aot"
)
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="GPU targets need the CUDA plugin: make install-aot",
)
TINY = os.path.join(REPO, "tests", "tiny_config.py")
FSDP = [
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
    "--config.sharding.student=fsdp",
    "--config.sharding.teachers=fsdp",
    "--config.sharding.fsdp_min_size=0",
]


def describe_teacher(directory, **arch) -> str:
    """A teacher directory holding only ``model.json``: the compile must never need its weights."""
    from hybrid_distill_jax.models import io as model_io
    from hybrid_distill_jax.models.vit import arch_dict, make_vit

    model = make_vit({**ARCH, "image_size": 32, **arch})
    os.makedirs(directory, exist_ok=True)
    meta = {
        "format": model_io.FORMAT,
        "arch": arch_dict(model),
        "input": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump(meta, f)
    return str(directory)


@pytest.fixture
def teachers(tmp_path):
    return [
        f"--config.teachers.deit.checkpoint={describe_teacher(tmp_path / 'deit', variant='nano/8')}",
        f"--config.teachers.mae.checkpoint={describe_teacher(tmp_path / 'mae')}",
    ]


def run_compile(args, tmp_path, timeout=600):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "hybrid_distill_jax.compile", "--config", TINY, *args, f"--json={out}"]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", XLA_PYTHON_CLIENT_MEM_FRACTION="0.9")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@needs_libtpu
def test_tiny_recipe_compiles_for_an_8_chip_tpu_slice_with_fsdp(tmp_path, teachers):
    proc, report = run_compile(["--target=v5e:2x4", *teachers, *FSDP], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert report["num_devices"] == 8 and report["num_processes"] == 2  # v5e:2x4 spans two hosts
    assert report["device_kind"] == "TPU v5 lite" and report["usable_memory_bytes"] == 16 * 2**30
    stages = report["stages"]
    assert [s["stage"] for s in stages] == [
        "keep=12",
        "keep=8",
    ]  # tiny_config: 16 patches, mask ratios 0.25 and 0.5
    for s in stages:
        assert s["fits"] and 0 < s["peak_bytes"] < report["usable_memory_bytes"]
        assert (
            s["argument_bytes"] > 0 and s["xla_flops_per_device"] > 0 and s["analytic_flops_per_device"] > 0
        )
        assert s["kernels"] is None  # the kernel plan is for GPU targets
    # fewer kept tokens, less work: XLA's count and ours agree on the direction and roughly on the size
    assert stages[1]["xla_flops_per_device"] < stages[0]["xla_flops_per_device"]
    ratio = stages[0]["xla_flops_per_device"] / stages[0]["analytic_flops_per_device"]
    assert 0.8 < ratio < 3.0, ratio  # XLA also counts the elementwise work the matmul count leaves out
    assert "| keep=12 |" in proc.stdout and "fits" in proc.stdout


@needs_cuda_plugin
def test_tiny_recipe_compiles_for_8_h100s_with_a_kernel_plan(tmp_path, teachers):
    bf16_teachers = ["--config.teachers.deit.dtype=bfloat16", "--config.teachers.mae.dtype=bfloat16"]
    proc, report = run_compile(
        ["--target=h100-sxm", "--gpus_per_host=8", *teachers, *bf16_teachers], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["num_devices"] == 8 and report["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert report["device_memory_bytes"] == 84_942_979_072  # the device description's device_memory_size
    assert report["usable_memory_bytes"] == int(84_942_979_072 * 0.9)  # JAX's pool at the launchers' 0.9
    for s in report["stages"]:
        plan = s["kernels"]
        assert s["fits"] and s["xla_flops_per_device"] is None  # no cost model for CUDA targets
        assert plan["gemm_calls"] > 0 and plan["triton_gemm_fusions"] == 0
        by_dtype = plan["gemm_calls_by_operand_dtype"]
        assert by_dtype.get("bf16 x bf16", 0) > 0  # the bf16 teachers
        # bf16 frozen teachers run on cuDNN's fused attention (attn_impl ''): teachers.deit's 4 blocks
        # (teachers.mae's one distilled block feeds nothing the step uses: only its q, k are kept)
        assert plan["fused_attention_calls"] == {"__cudnn$fmhaSoftmax": 4}
        assert by_dtype.get("f32 x f32", 0) > 0  # the fp32 student
        assert sum(by_dtype.values()) == plan["gemm_calls"]
        assert plan["collectives"].get("all-reduce", 0) >= 1  # gradients over 8 data-parallel GPUs
        assert plan["largest_buffers"] and all(b["bytes"] > 0 for b in plan["largest_buffers"])
    assert "## kernel plan, keep=12" in proc.stdout and "GEMM calls:" in proc.stdout


@needs_libtpu
def test_a_stage_that_does_not_fit_exits_1_naming_the_stage_and_the_bytes(tmp_path, teachers):
    proc, report = run_compile(
        ["--target=v5e:2x4", "--stages=first", *teachers, "--config.batch_size=4194304"], tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "stage keep=12 does not fit on v5e:2x4" in errors[0] and "bytes" in errors[0]
    (stage,) = report["stages"]
    assert not stage["fits"] and f"needs {stage['peak_bytes']:,} bytes" in errors[0]
    assert "DOES NOT FIT" in proc.stdout


@needs_cuda_plugin
def test_fp8_teachers_compile_to_cublaslt_fp8_gemms_on_an_h200(tmp_path, teachers):
    fp8 = ["--config.teachers.deit.fp8=True", "--config.teachers.mae.fp8=True", "--stages=first"]
    proc, report = run_compile(["--target=h200", "--gpus_per_host=1", *teachers, *fp8], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = report["stages"][0]["kernels"]
    # teachers.deit's 4 blocks x (qkv, proj, fc1, fc2), and teachers.mae's block-1 qkv: the
    # queries and keys of its one distilled layer are all the step reads of it (XLA drops the rest)
    assert plan["gemm_calls_by_kernel"]["__cublas$lt$matmul$f8"] == 4 * 4 + 1
    assert plan["gemm_calls_by_operand_dtype"]["f8e4m3fn x f8e4m3fn"] == 4 * 4 + 1


@needs_cuda_plugin
def test_a_bf16_student_trains_on_cudnn_attention_in_blocks_whose_probabilities_nobody_reads(
    tmp_path, teachers
):
    bf16 = ["--config.student.dtype=bfloat16", "--config.teachers.deit.dtype=bfloat16"]
    bf16 += ["--config.teachers.mae.dtype=bfloat16"]
    proc, report = run_compile(["--target=h200", "--gpus_per_host=1", *teachers, *bf16], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for s in report["stages"]:  # 1 + 12 and 1 + 8 student tokens: padded to even lengths
        # teachers.deit's 4 blocks, and the student's block 2 (pico/8 has 2; terms.relation reads the
        # probabilities of block 1) forward and backward
        assert s["kernels"]["fused_attention_calls"] == {
            "__cudnn$fmhaSoftmax": 4 + 1,
            "__cudnn$fmhaSoftmaxBackward": 1,
        }
    xla = ["--stages=first", "--config.student.attn_impl=xla"]
    proc, report = run_compile(["--target=h200", "--gpus_per_host=1", *teachers, *bf16, *xla], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["stages"][0]["kernels"]["fused_attention_calls"] == {"__cudnn$fmhaSoftmax": 4}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target=v9:2x2"], "--target='v9:2x2': expected a TPU slice"),
        (["--target=v5p:2x2"], "a v5p topology has 3 dimensions"),
        (
            ["--target=h200", "--config.batch_size=12"],
            "batch_size=12 is not divisible by the data-parallel size 8",
        ),
        (["--target=h200", "--stages=7"], "--stages='7': expected 'all', 'first' or indices below 2"),
    ],
)
def test_bad_targets_and_configs_are_one_line_exit_2(tmp_path, teachers, args, message):
    if "h200" in args[0] and importlib.util.find_spec("jax_cuda12_plugin") is None:
        pytest.skip("needs the CUDA plugin: make install-aot")
    if "v5p" in args[0] and importlib.util.find_spec("libtpu") is None:
        pytest.skip("needs libtpu: make install-aot")
    proc, _ = run_compile([*args, *teachers], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


# Runs in its own process (the CUDA compiler must be chosen before JAX starts): compiles the tiny recipe
# for 8 H100s, replicated and FSDP, and prints what the report says beside what the compiled object and
# the program's own input shards say.
_MEMORY_PROBE = """
import json, math, sys
import numpy as np
from hybrid_distill_jax.aot import targets
targets.prepare_environment("cuda")
import jax
from hybrid_distill_jax import compile as aot_compile
from hybrid_distill_jax.config_file import load_config_file

target = targets.describe("h100-sxm", gpus_per_host=8)
out = {}
for name, fsdp in (("replicated", False), ("fsdp", True)):
    c = load_config_file(sys.argv[1])
    c.teachers.deit.checkpoint, c.teachers.mae.checkpoint = sys.argv[2], sys.argv[3]
    if fsdp:
        c.mesh.update(dict(data=1, fsdp=-1))
        c.sharding.update(dict(student="fsdp", teachers="fsdp", fsdp_min_size=0))
    program, stages = aot_compile.deviceless_program(c, target, train_examples=1000, num_classes=10)
    report = aot_compile.compile_stage(program, stages[0], target)
    memory = program.lower(stages[0]).compile().memory_analysis()
    inputs = jax.tree.leaves(program.abstract_inputs(program.task.frozen))
    shards = sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in inputs)
    out[name] = dict(
        report=[report.argument_bytes, report.output_bytes, report.temp_bytes, report.peak_bytes],
        compiled=[memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes,
                  memory.peak_memory_in_bytes],
        input_shard_bytes=shards,
    )
print(json.dumps(out))
"""


@needs_cuda_plugin
def test_reported_memory_is_the_compiled_programs_own(tmp_path):
    """Every reported number is memory_analysis()'s, and the argument bytes per device are exactly the
    per-device shards of state, teachers and batch: FSDP divides them by the number of GPUs."""
    feature, relation = describe_teacher(tmp_path / "f", variant="nano/8"), describe_teacher(tmp_path / "r")
    cmd = [sys.executable, "-c", _MEMORY_PROBE, TINY, feature, relation]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in out.values():
        assert case["report"] == case["compiled"]
        assert case["report"][0] == case["input_shard_bytes"]
    replicated, split = out["replicated"]["report"][0], out["fsdp"]["report"][0]
    assert split < replicated / 4  # parameters and Adam moments split 8 ways; the batch already was

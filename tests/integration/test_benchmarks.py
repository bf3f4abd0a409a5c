"""The benchmark scripts run on the CPU at a tiny size (their numbers matter only on real hardware)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

BENCH = os.path.join(REPO, "benchmarks")


def _json_lines(cmd, env=None):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_torch_peer_runs_a_tiny_step_on_the_cpu():
    cmd = [sys.executable, os.path.join(BENCH, "torch_peer.py"), "--preset", "tiny", "--device", "cpu"]
    (out,) = _json_lines(cmd + ["--batch", "4", "--steps", "2", "--warmup", "1", "--keep", "0.25"])
    assert out["impl"] == "torch-eager" and out["batch"] == 4 and out["kept_tokens"] == 4
    assert np.isfinite(out["loss"]) and out["loss"] > 0 and out["img_s"] > 0


def test_torch_peer_kept_block_matches_numpy_indexing():
    import torch

    sys.path.insert(0, BENCH)
    from torch_peer import kept_block

    logits = torch.randn(2, 3, 7, 7)
    index = torch.tensor([[0, 2, 5], [0, 6, 1]])
    out = kept_block(logits, index).numpy()
    full, i = logits.numpy(), index.numpy()
    np.testing.assert_array_equal(out, np.stack([full[b][:, i[b]][:, :, i[b]] for b in range(2)]))


def test_accelerator_check_fails_fast_without_a_gpu():
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: the check would run for minutes")
    proc = subprocess.run(
        ["bash", os.path.join(BENCH, "accelerator_check.sh")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "no NVIDIA GPU" in proc.stderr and not proc.stdout


def test_throughput_runs_the_products_step_with_and_without_the_input_pipeline(tmp_path):
    sys.path.insert(0, BENCH)
    import input_pipeline

    folder = input_pipeline.make_jpegs(str(tmp_path / "jpegs"), 24, classes=2)
    cmd = [
        sys.executable,
        os.path.join(BENCH, "throughput.py"),
        *"--cpu-smoke --keep 0.5 --data".split(),
        folder,
    ]
    (run,) = _json_lines(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert run["kept_tokens"] == 8 and run["finite"] and np.isfinite(run["e2e_loss"])
    assert run["img_s"] > 0 and run["e2e_img_s"] > 0


def test_throughput_runs_without_tensorflow_and_reuses_exported_teachers(tmp_path):
    """The GPU machines the accelerator check runs on may lack TensorFlow: the synthetic-input benchmark
    (the step, the task, the teachers) must not import it; --teachers_dir exports the teachers once."""
    for name in ("tensorflow", "tensorflow_datasets"):
        (tmp_path / "blocked" / name).mkdir(parents=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(tmp_path / "blocked"))
    teachers = tmp_path / "teachers"
    cmd = [sys.executable, os.path.join(BENCH, "throughput.py"), "--cpu-smoke", "--keep", "0.5"]
    cmd += ["--teachers_dir", str(teachers)]
    (first,) = _json_lines(cmd, env=env)
    assert first["finite"] and (teachers / "tiny" / "deit" / "model.json").exists()
    stamp = os.path.getmtime(teachers / "tiny" / "mae" / "params.msgpack")
    (second,) = _json_lines(cmd, env=env)
    assert second["finite"] and os.path.getmtime(teachers / "tiny" / "mae" / "params.msgpack") == stamp


def test_input_pipeline_benchmark_measures_each_implementation(tmp_path):
    cmd = [sys.executable, os.path.join(BENCH, "input_pipeline.py"), *"--quick --images 48 --batch 8".split()]
    cmd += ["--size", "32", "--workdir", str(tmp_path), "--impls", "ours-folder,ours-tfds,tfdata,torch"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in runs] == ["ours-folder", "ours-tfds", "tfdata", "torch"]
    assert all(r["img_s"] > 0 and r["dtype"].endswith("uint8") for r in runs)
    assert "| ours-tfds | " in proc.stdout and "load average" in proc.stdout


def _make_teachers(tmp_path):
    """Two exported tiny teachers (nano/8 deit: the feature term's, pico/8 mae: the relation term's), as a
    recipe would name them."""
    from tests.helpers import make_teacher

    deit = make_teacher(tmp_path / "deit_teacher", variant="nano/8")
    mae = make_teacher(tmp_path / "mae_teacher")
    return [
        f"--config.teachers.deit.checkpoint={deit}",
        f"--config.teachers.mae.checkpoint={mae}",
    ]


def test_throughput_times_a_recipe_as_shipped(tmp_path):
    """--config runs the recipe's own step: its architectures and dtypes (float32 in the tiny recipe, where
    a preset computes in bf16), every stage of its masking schedule, its global batch, overrides applied;
    the teachers are random-init exports of the architectures the recipe names."""
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        os.path.join(BENCH, "throughput.py"),
        "--config",
        "tests/tiny_config.py",
        "--cpu-smoke",
    ]
    cmd += [*_make_teachers(tmp_path), "--config.terms.relation.weight=0.5", "--json", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device: 8 images per chip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# recipe tiny (tests/tiny_config.py, overrides --config.teachers.deit.checkpoint=" in proc.stdout
    assert "student pico/8 at 32 px computes in float32, params in float32" in proc.stdout
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in runs] == ["keep=12", "keep=8"]  # stage_ratios (0.25, 0.5) of 16 patches
    for r in runs:
        assert r["recipe"] == "tiny" and r["preset"] is None and r["batch_per_chip"] == 8
        assert r["precision"] == {
            "student": "float32",
            "student_params": "float32",
            "student_attn_impl": "xla",
            "teachers": {"deit": "float32", "mae": "float32"},
            "teacher_attn_impl": {"deit": "xla", "mae": "xla"},
            "teacher_fp8": {"deit": False, "mae": False},
        }
        assert r["finite"] and r["img_s"] > 0 and r["step_s"] > 0
        parts = r["gflop_per_img_parts"]  # the recipe's teachers: a nano/8 deit, a pico/8 mae
        assert parts["deit_teacher_fwd"] > parts["mae_teacher_fwd"] > 0
    result = json.loads(out.read_text())
    assert result["recipe"] == "tiny" and result["config"] == "tests/tiny_config.py"
    assert result["schedule"]["shares"] == {"keep=12": 0.5, "keep=8": 0.5}
    assert result["schedule"]["img_s_per_chip"] > 0
    assert f"{result['schedule']['img_s_per_chip']} img/s/chip" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--remat_policy", "full"], "override the recipe instead: --config.student.remat_policy=POLICY"),
        (["--keep", "0.5"], "--config.masking.stage_ratios"),
        (["--config.no_such=1"], "error: --config.no_such: no such field in the config"),
        ([], "error: teachers.deit.checkpoint='': no model.json there"),  # the tiny recipe names none
    ],
)
def test_throughput_recipe_command_line_errors(args, message):
    cmd = [
        sys.executable,
        os.path.join(BENCH, "throughput.py"),
        "--cpu-smoke",
        "--config",
        "tests/tiny_config.py",
    ]
    proc = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_throughput_profile_summarises_the_traced_step(tmp_path):
    """--profile traces the step after its timed steps; on the CPU the ops are the XLA thunks on host
    threads. The kinds add up to the busy time, the ops lie inside the traced window, and the matmuls
    (XLA's CPU 'ynn_fusion' dots and plain dots) are GEMM time."""
    profile_dir = tmp_path / "profile"
    cmd = [sys.executable, os.path.join(BENCH, "throughput.py"), "--cpu-smoke", "--keep", "0.5"]
    cmd += ["--profile", str(profile_dir)]
    (run,) = _json_lines(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    summary = json.loads((profile_dir / "tiny-keep8" / "summary.json").read_text())
    assert run["profile"] == summary and summary["steps"] == 3 and summary["module"]
    assert summary["devices"] == 1 and all(line.startswith("/host:CPU ") for line in summary["lines"])
    kinds = summary["kinds"]
    assert list(kinds) == ["gemm", "attention", "fusion", "copy/transpose", "collective", "other"]
    busy = summary["busy_ms_per_step"]
    assert busy > 0 and abs(sum(k["ms_per_step"] for k in kinds.values()) - busy) < 1e-3 * len(kinds)
    assert abs(sum(k["pct"] for k in kinds.values()) - 100) < 0.5
    assert 0.3 * summary["span_ms_per_step"] <= busy  # the step keeps the device busy
    assert summary["span_ms_per_step"] <= summary["traced_step_ms"] * 1.01  # ops inside the traced steps
    assert kinds["gemm"]["pct"] > 5 and kinds["other"]["pct"] < 20
    assert summary["top_ops"] and all(o["kind"] in kinds for o in summary["top_ops"])

    # The command line summarises the same trace again (reading the step's HLO kept beside it).
    cmd = [sys.executable, os.path.join(BENCH, "profile_summary.py"), str(profile_dir / "tiny-keep8")]
    again = tmp_path / "again.json"
    proc = subprocess.run(
        cmd + ["--steps", "3", "--json", str(again)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| gemm | " in proc.stdout and json.loads(again.read_text())["kinds"] == kinds


# GPU-style names: kernel name, then hlo_op, then what hlo_descriptions says of it (as summarize joins them).
KIND_CASES = [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN custom-call.12 custom-call __cublas$lt$matmul", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel", "gemm"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", "gemm"),
    ("gemm_fusion_dot_12 gemm_fusion_dot.12 fusion __triton_gemm computes:dot", "gemm"),
    ("__cublas$gemm", "gemm"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc convolution.3", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0 custom-call.7", "attention"),
    ("custom-call.9 custom-call __cudnn$fmhaSoftmax", "attention"),
    ("flash_fwd_kernel", "attention"),
    ("loop_add_fusion add_fusion.3 fusion", "fusion"),
    ("input_reduce_fusion_2 reduce_fusion.2 fusion", "fusion"),
    ("wrapped_convert", "fusion"),
    ("triton_softmax_3", "fusion"),
    ("loop_transpose_fusion transpose_fusion.1 fusion", "copy/transpose"),
    ("copy.3 copy", "copy/transpose"),
    ("MemcpyD2D", "copy/transpose"),
    ("Memset", "copy/transpose"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL all-reduce-start.2 all-reduce-start", "collective"),
    ("ncclKernel_AllGather_RING_LL_Sum_int8_t", "collective"),
    ("reduce-scatter.1 reduce-scatter", "collective"),
    ("all-gather-start.4", "collective"),
    ("collective-permute-start.1", "collective"),
    ("while.3 while", "other"),
    ("DeviceRadixSortOnesweepKernel sort.2 sort", "other"),
    ("rng-bit-generator.1 rng-bit-generator", "other"),
    # XLA's CPU back end: a dot fused by YNNPACK, a plain dot, an element-wise YNNPACK fusion.
    ("ynn_fusion.187 fusion __ynn_fusion computes:dot", "gemm"),
    ("ynn_fusion.1 fusion __ynn_fusion computes:convolution", "gemm"),
    ("dot.87 dot", "gemm"),
    ("ynn_fusion.4 fusion __ynn_fusion", "fusion"),
    ("transpose_copy_fusion.47 fusion", "copy/transpose"),
    ("convert_reduce_fusion.6 fusion", "fusion"),
]


@pytest.mark.parametrize("description,kind", KIND_CASES)
def test_profile_classifier(description, kind):
    sys.path.insert(0, BENCH)
    from profile_summary import classify

    assert classify(description) == kind


def test_profile_hlo_descriptions_and_own_times():
    """Fusions that compute a dot (nested fusions too) say so; custom calls name their target; an op's own
    time leaves out the ops nested in it on the same line."""
    sys.path.insert(0, BENCH)
    from profile_summary import hlo_descriptions, self_times

    hlo = """HloModule jit_step, entry_computation_layout={()->f32[]}

%inner (p0: bf16[8,8], p1: bf16[8,8]) -> f32[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (p0.1: bf16[8,8], p1.1: bf16[8,8]) -> f32[8,8] {
  %p0.1 = bf16[8,8]{1,0} parameter(0)
  %p1.1 = bf16[8,8]{1,0} parameter(1)
  ROOT %nested = f32[8,8]{1,0} fusion(%p0.1, %p1.1), kind=kCustom, calls=%inner
}

%adds (p0.2: f32[8,8]) -> f32[8,8] {
  %p0.2 = f32[8,8]{1,0} parameter(0)
  ROOT %add.1 = f32[8,8]{1,0} add(%p0.2, %p0.2)
}

ENTRY %main (a: bf16[8,8], b: bf16[8,8]) -> f32[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %gemm_fusion_dot.2 = f32[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%outer, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.3 = (f32[8,8]{1,0}, s8[64]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  ROOT %add_fusion = f32[8,8]{1,0} fusion(%gemm_fusion_dot.2), kind=kLoop, calls=%adds
}
"""  # noqa: E501
    described = hlo_descriptions(hlo)
    assert described["gemm_fusion_dot.2"] == "fusion __triton_gemm computes:dot"
    assert described["custom-call.3"] == "custom-call __cublas$lt$matmul"
    assert described["add_fusion"] == "fusion"
    line = ("/host:CPU", "t0")
    ops = [(line, "while.1", None, 0, 100), (line, "a", None, 10, 30), (line, "b", None, 40, 90)]
    ops.append((("/host:CPU", "t1"), "c", None, 20, 60))  # another thread: not nested
    assert self_times(ops) == [30, 20, 50, 40]


def test_throughputs_attention_flags_offer_the_configs_kernels():
    sys.path.insert(0, BENCH)
    import throughput

    from hybrid_distill_jax.models.build import ATTN_IMPLS

    assert throughput.ATTN_IMPLS == ATTN_IMPLS

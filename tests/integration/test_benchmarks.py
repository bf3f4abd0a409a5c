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
    assert first["finite"] and (teachers / "tiny" / "feature" / "model.json").exists()
    stamp = os.path.getmtime(teachers / "tiny" / "relation" / "params.msgpack")
    (second,) = _json_lines(cmd, env=env)
    assert second["finite"] and os.path.getmtime(teachers / "tiny" / "relation" / "params.msgpack") == stamp


def test_input_pipeline_benchmark_measures_each_implementation(tmp_path):
    cmd = [sys.executable, os.path.join(BENCH, "input_pipeline.py"), *"--quick --images 48 --batch 8".split()]
    cmd += ["--size", "32", "--workdir", str(tmp_path), "--impls", "ours-folder,ours-tfds,tfdata,torch"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in runs] == ["ours-folder", "ours-tfds", "tfdata", "torch"]
    assert all(r["img_s"] > 0 and r["dtype"].endswith("uint8") for r in runs)
    assert "| ours-tfds | " in proc.stdout and "load average" in proc.stdout

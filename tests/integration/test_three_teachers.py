"""Three named teachers through the real CLI (``tests/tiny_config.py:three``): DeiT-like final tokens,
DINO-like block-2 hidden tokens into the student's block 1, MAE-like relations. The run trains (each
term falls), resumes bit-identically after SIGKILLs, and its export loads in timm with equal outputs."""

import os
import sys

import numpy as np
import pytest

from hybrid_distill_jax.train import metrics
from tests.helpers import (
    REPO,
    assert_kill_and_resume_match,
    make_teacher,
    run_cli,
    timm_parity_error,
)

TERMS = ("feature_loss", "relation_loss", "dino_block2_loss")
# DINO-like: wider and deeper than the pico student, with its own head count (it is distilled by tokens
# only, so only the grid must match).
DINO_ARCH = dict(width=48, depth=3, num_heads=3, mlp_dim=96)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("three_teachers")
    return dict(
        deit=make_teacher(root / "deit", seed=1),
        mae=make_teacher(root / "mae", seed=2),
        dino=make_teacher(root / "dino", seed=3, **DINO_ARCH),
    )


def _cli(workdir, tfds_dir, teachers, steps=12):
    return [
        sys.executable,
        "-m",
        "hybrid_distill_jax.main",
        "--config",
        os.path.join(REPO, "tests", "tiny_config.py") + ":three",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tfds_dir}",
        f"--config.total_steps={steps}",
        *(f"--config.teachers.{name}.checkpoint={path}" for name, path in teachers.items()),
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir, teachers):
    workdir = tmp_path_factory.mktemp("three_reference")
    proc = run_cli(_cli(workdir, tfds_dir, teachers))
    return workdir, proc


def test_three_teachers_train_and_the_progress_line_names_each_term(reference):
    workdir, proc = reference
    rows = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == list(range(1, 13))
    for term in TERMS:
        values = [r[term] for r in rows]
        first, last = np.mean(values[:3]), np.mean(values[-3:])
        print(f"\n[three teachers] {term}: first 3 steps {first:.4f}, last 3 {last:.4f}")
        assert last < first, term
    line = [ln for ln in proc.stdout.splitlines() if "step 12/12" in ln][-1]
    assert all(f"{term} " in line for term in TERMS), line


def test_three_teachers_resume_bit_identically_after_kills(tmp_path, tfds_dir, teachers, reference):
    cli = lambda workdir: _cli(workdir, tfds_dir, teachers)  # noqa: E731
    assert_kill_and_resume_match(cli, tmp_path / "killed", reference[0], TERMS)


def test_three_teacher_export_loads_in_timm(reference, tmp_path):
    pytest.importorskip("torch", reason="needs torch: bash scripts/install_torch_cpu.sh")
    from hybrid_distill_jax.models import io as model_io

    workdir, _ = reference
    export = os.path.join(workdir, "export")
    assert set(model_io.read_model_json(export)["teachers"]) == {"deit", "mae", "dino"}  # sources recorded
    err = timm_parity_error(export, str(tmp_path / "student.safetensors"))
    print(f"\n[parity] three-teacher student -> timm: tokens max|err|={err:.2e}")
    assert err < 1e-5

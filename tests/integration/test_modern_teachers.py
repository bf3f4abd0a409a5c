"""Three teachers of today's kinds through the real CLI (``tests/tiny_config.py:modern``): a DINOv2-like
one (registers, LayerScale, a patch-4 grid resampled onto the student's 4x4) gives tokens and scores the
patches by CLS attention, a DINOv3-like one (RoPE, registers) relations, a SigLIP-like one (no CLS, a MAP
head) the summary embedding and patch tokens. The run trains (each term falls), also with the patches
scored by SigLIP's MAP query, resumes bit-identically after SIGKILLs, and its export loads in timm with
equal outputs; inputs these teachers cannot serve are one line naming the field, exit status 2."""

import json
import os
import shutil
import subprocess
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
    tiny_cli_env,
)

TERMS = ("feature_loss", "relation_loss", "summary_loss", "siglip_tokens_loss")
STEPS = 12
# Random-init teachers of the three kinds, 32 px images; the student is pico/8 (width 32, 2 heads, 4x4).
DINOV2 = dict(num_registers=4, layer_scale_init=1e-5, prefix_posemb=False, patch_size=4)
DINOV3 = dict(
    posemb="rope", num_registers=4, layer_scale_init=1e-5, qkv_bias=False, norm_eps=1e-5, num_heads=2
)
SIGLIP = dict(class_token=False, pool="map")
MAP_SCORES = ("--config.masking.score_teacher=siglip", "--config.masking.score=map_attention")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One compile cache for every run of the module (``tiny_cli_env`` passes the environment on): the
    killed runs reuse the reference run's executables."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        yield


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """The three teachers. DINOv2's and DINOv3's weights are perturbed: LayerScale initialised at 1e-5
    would leave them near-identity, their tokens the patch embedding's."""
    from hybrid_distill_jax.models import io as model_io

    root = tmp_path_factory.mktemp("modern_teachers")
    made = dict(
        dinov2=make_teacher(root / "dinov2", seed=1, perturb_seed=11, **DINOV2),
        dinov3=make_teacher(root / "dinov3", seed=2, perturb_seed=12, **DINOV3),
        siglip=make_teacher(root / "siglip", seed=3, perturb_seed=13, **SIGLIP),
    )
    for name in ("dinov2", "dinov3"):
        _, params, _ = model_io.load_model(made[name])
        assert np.abs(params["block1"]["ls1"]["gamma"]).mean() > 1e-2, name
    return made


def _cli(workdir, tfds_dir, teachers, *overrides, steps=STEPS):
    return [
        sys.executable,
        "-m",
        "hybrid_distill_jax.main",
        "--config",
        os.path.join(REPO, "tests", "tiny_config.py") + ":modern",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tfds_dir}",
        f"--config.total_steps={steps}",
        *(f"--config.teachers.{name}.checkpoint={path}" for name, path in teachers.items()),
        *overrides,
    ]


def _assert_each_term_falls(workdir, label):
    rows = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for term in TERMS:
        values = [r[term] for r in rows]
        first, last = np.mean(values[:3]), np.mean(values[-3:])
        print(f"\n[{label}] {term}: first 3 steps {first:.4f}, last 3 {last:.4f}")
        assert last < first, term


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir, teachers):
    workdir = tmp_path_factory.mktemp("modern_reference")
    proc = run_cli(_cli(workdir, tfds_dir, teachers))
    return workdir, proc


def test_modern_teachers_train_and_the_progress_line_names_each_term(reference):
    workdir, proc = reference
    _assert_each_term_falls(workdir, "modern, dinov2 CLS scores")
    line = [ln for ln in proc.stdout.splitlines() if f"step {STEPS}/{STEPS}" in ln][-1]
    assert all(f"{term} " in line for term in TERMS), line


def test_modern_teachers_train_with_patches_scored_by_the_map_query(tmp_path, tfds_dir, teachers):
    workdir = tmp_path / "map_scores"
    run_cli(_cli(workdir, tfds_dir, teachers, *MAP_SCORES))
    _assert_each_term_falls(workdir, "modern, siglip MAP scores")


def test_modern_teachers_resume_bit_identically_after_kills(tmp_path, tfds_dir, teachers, reference):
    cli = lambda workdir: _cli(workdir, tfds_dir, teachers)  # noqa: E731
    assert_kill_and_resume_match(cli, tmp_path / "killed", reference[0], TERMS)


def test_modern_teacher_export_loads_in_timm(reference, tmp_path):
    pytest.importorskip("torch", reason="needs torch: bash scripts/install_torch_cpu.sh")
    from hybrid_distill_jax.models import io as model_io

    workdir, _ = reference
    export = os.path.join(workdir, "export")
    assert set(model_io.read_model_json(export)["teachers"]) == {"dinov2", "dinov3", "siglip"}
    err = timm_parity_error(export, str(tmp_path / "student.safetensors"))
    print(f"\n[parity] modern-teacher student -> timm: tokens max|err|={err:.2e}")
    assert err < 1e-5


def _registers_misstated(tmp_path, teachers):
    """A copy of the DINOv2-like teacher whose model.json says 2 registers; its params hold 4."""
    copy = tmp_path / "dinov2_misstated"
    shutil.copytree(teachers["dinov2"], copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["arch"]["num_registers"] = 2
    (copy / "model.json").write_text(json.dumps(meta))
    return (
        [f"--config.teachers.dinov2.checkpoint={copy}"],
        f"error: teachers.dinov2.checkpoint: {copy}/model.json says num_registers=2, params.msgpack holds "
        "4 register tokens",
    )


def _rope_relations_on_kept_interpolated(tmp_path, teachers):
    patch4 = make_teacher(tmp_path / "dinov3_patch4", seed=2, **{**DINOV3, "patch_size": 4})
    overrides = [
        f"--config.teachers.dinov3.checkpoint={patch4}",
        "--config.teachers.dinov3.interpolate_grid=True",
        "--config.terms.relation.teacher_on_kept=True",
    ]
    return overrides, "error: terms.relation.teacher_on_kept=True runs teacher 'dinov3' on the student's kept"


BAD_INPUTS = {
    "rope relations on kept patches of an interpolated grid": _rope_relations_on_kept_interpolated,
    "cls attention scores from a teacher without CLS": lambda tmp_path, teachers: (
        ["--config.masking.score_teacher=siglip", "--config.masking.score=cls_attention"],
        "error: masking.score='cls_attention': teacher 'siglip' has no CLS token; use "
        "masking.score='map_attention'",
    ),
    "relations on a teacher without CLS": lambda tmp_path, teachers: (
        ["--config.terms.relation.teacher=siglip"],
        "error: terms.relation: teacher 'siglip' has no CLS token",
    ),
    "model.json's register count disagrees with params.msgpack": _registers_misstated,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_modern_teacher_inputs_are_one_line_and_exit_2(tmp_path, tfds_dir, teachers, case):
    overrides, expected = BAD_INPUTS[case](tmp_path, teachers)
    command = _cli(tmp_path / "run", tfds_dir, teachers, *overrides)
    proc = subprocess.run(command, cwd=REPO, env=tiny_cli_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(expected), errors[0]

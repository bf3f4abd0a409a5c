"""Hardware the run asks for and cannot have, through the real command lines: a compile target's device
description damaged or incomplete (it used to end in a UnicodeDecodeError traceback, or in SIGFPE with
nothing printed), JAX_PLATFORMS naming an accelerator this host lacks (a libtpu traceback, a bare
AssertionError) and cuDNN attention asked for where there is no NVIDIA GPU (``cuDNN is not detected``).
Each is one line naming the culprit, exit status 2, no traceback, and nothing written or changed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from hybrid_distill_jax import config_lib, hardware
from hybrid_distill_jax.aot import targets
from hybrid_distill_jax.errors import ConfigError
from tests.helpers import REPO, files_under, make_teacher, tiny_cli, tiny_cli_env, tiny_distill_config
from tests.integration.test_bad_files import CORRUPTIONS, _drop_read_capabilities, _root_reads_anything
from tests.integration.test_compile import TINY, describe_teacher

H200 = os.path.join(targets.GPU_SPECS_DIR, targets.GPU_CARDS["h200"])
# Informational lines TensorFlow and XLA log at start-up (glog's 'I' lines, absl's banner): not errors.
_START_UP_LOG = re.compile(r"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called")


def one_line(proc: subprocess.CompletedProcess, logs: re.Pattern = _START_UP_LOG) -> str:
    """The one line ``proc`` wrote to stderr, once it is asserted that the process exited 2 without a
    traceback and that this line is all it wrote there, lines matching ``logs`` aside."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not logs.match(line)]
    ok = proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1
    assert ok and lines[0].startswith("error: "), f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    return lines[0]


@pytest.fixture
def teachers(tmp_path):
    """Teacher descriptions for a compile (``model.json`` only), outside the directory the test watches."""
    root = tmp_path / "teachers"
    return [
        f"--config.teachers.deit.checkpoint={describe_teacher(root / 'deit', variant='nano/8')}",
        f"--config.teachers.mae.checkpoint={describe_teacher(root / 'mae')}",
    ]


def compile_refuses(args: list[str], run_dir, preexec_fn=None, logs: re.Pattern = _START_UP_LOG) -> str:
    """Runs a compile (as ``test_compile.run_compile`` does; ``preexec_fn`` in the child) with ``args``,
    whose report (``--json``) would replace an earlier one in ``run_dir``; asserts it refuses in one line
    (returned; ``one_line``) and writes or changes nothing there."""
    (run_dir / "report.json").write_text('{"an": "earlier report"}\n')
    before = files_under(run_dir)
    cmd = [sys.executable, "-m", "hybrid_distill_jax.compile", "--config", TINY, *args]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
    proc = subprocess.run(
        [*cmd, f"--json={run_dir / 'report.json'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )
    line = one_line(proc, logs)
    assert files_under(run_dir) == before, "the compile wrote or changed a file"
    return line


def description_refused(description: str, run_dir, teachers, preexec_fn=None) -> str:
    """``compile_refuses`` for a single-GPU target described by the file ``description``; asserts the line
    names it."""
    args = [f"--target={description}", "--gpus_per_host=1", *teachers]
    line = compile_refuses(args, run_dir, preexec_fn)
    assert line.startswith(f"error: --target={description}"), line
    return line


# ------------------------------------------------------------------------ compile target descriptions

EXPECTED_FOR_DAMAGE = {
    "missing": "no GPU description at",
    "empty": "gpu_device_info { ... } missing; a GPU description needs it once",
    "truncated": "not a GPU description (GpuTargetConfigProto text): line 45: value { is never closed",
    "random_bytes": "not a GPU description (GpuTargetConfigProto text): not UTF-8 text: byte 0x",
    "directory": "no GPU description at",
    "unreadable": "cannot read",
    "wrong_kind": "not a GPU description (GpuTargetConfigProto text): line 1: expected a field name, got '{'",
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_a_damaged_gpu_description_is_one_line_naming_it(tmp_path, teachers, damage):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    description = tmp_path / "card.txtpb"
    shutil.copy(H200, description)
    CORRUPTIONS[damage](str(description))
    cut = _drop_read_capabilities if damage == "unreadable" and _root_reads_anything() else None
    line = description_refused(str(description), run_dir, teachers, preexec_fn=cut)
    assert EXPECTED_FOR_DAMAGE[damage] in line, line


def _edited(line_pattern: str, replacement: str) -> str:
    """The shipped H200 description with the first line matching ``line_pattern`` replaced."""
    with open(H200) as f:
        text = f.read()
    edited = re.sub(line_pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert edited != text, line_pattern
    return edited


BAD_DESCRIPTIONS = {
    "only a memory size": (  # killed the compile with SIGFPE, nothing printed
        "gpu_device_info {\n  device_memory_size: 84942979072\n}\n",
        "gpu_device_info.threads_per_block_limit, threads_per_warp, shared_memory_per_block and 16 more "
        "missing; XLA's GPU compiler needs each",
    ),
    "zero that divides": (  # XLA divides by it: SIGFPE
        _edited(r"^  threads_per_warp: 32$", "  threads_per_warp: 0"),
        "gpu_device_info.threads_per_warp must be a positive integer, got 0 (line 6)",
    ),
    "negative size": (
        _edited(r"^  shared_memory_per_block: \d+$", "  shared_memory_per_block: -49152"),
        "gpu_device_info.shared_memory_per_block must be a positive integer, got -49152 (line 7)",
    ),
    "string for a count": (
        _edited(r"^  core_count: 132$", '  core_count: "132"'),
        'gpu_device_info.core_count must be a positive integer, got "132" (line 10)',
    ),
    "fraction for a count": (
        _edited(r"^  core_count: 132$", "  core_count: 131.5"),
        "gpu_device_info.core_count must be a positive integer, got 131.5 (line 10)",
    ),
    "nan clock": (
        _edited(r"^  clock_rate_ghz: 1.98$", "  clock_rate_ghz: nan"),
        "gpu_device_info.clock_rate_ghz must be a positive number, got nan (line 17)",
    ),
    "field given twice": (
        _edited(r"^  core_count: 132$", "  core_count: 132\n  core_count: 66"),
        "gpu_device_info.core_count is given more than once",
    ),
    "no compute capability": (
        _edited(r"^  cuda_compute_capability \{\n(.*\n){2}  \}\n", ""),
        "gpu_device_info.cuda_compute_capability { ... } missing",
    ),
    "compute capability 0": (
        _edited(r"^    major: 9$", "    major: 0"),
        "gpu_device_info.cuda_compute_capability.major must be a positive integer, got 0 (line 21)",
    ),
    "unclosed message": (
        _edited(r"^}\n", ""),
        "not a GPU description (GpuTargetConfigProto text): line 4: gpu_device_info { is never closed "
        "(no '}')",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DESCRIPTIONS))
def test_a_bad_field_of_a_gpu_description_is_one_line_naming_it(tmp_path, teachers, case):
    text, expected = BAD_DESCRIPTIONS[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    description = tmp_path / "card.txtpb"
    description.write_text(text)
    line = description_refused(str(description), run_dir, teachers)
    assert expected in line, line


@pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="XLA reads the description: make install-aot",
)
def test_a_field_xla_does_not_know_is_one_line_with_xla_s_reason(tmp_path, teachers):
    """What the description's own checks pass, XLA parses: its reason, which it logs on stderr beside a
    vaguer exception, becomes the one line."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    description = tmp_path / "card.txtpb"
    description.write_text(
        _edited(r"^  core_count: 132$", "  core_count: 132\n  collective_memory_granularity: 2")
    )
    line = description_refused(str(description), run_dir, teachers)
    assert line.endswith(
        'XLA cannot read it: line 11, column 32: Message type "stream_executor.GpuDeviceInfoProto" has no '
        'field named "collective_memory_granularity".'
    ), line


def test_the_shipped_gpu_descriptions_pass_their_checks():
    for card in targets.GPU_CARDS:
        _, memory = targets.gpu_spec(card)
        assert memory > 64 * 2**30


# ----------------------------------------------------------------------------------------- JAX_PLATFORMS


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)


ACCELERATORS = {"tpu": "TPU", "cuda": "NVIDIA GPU"}


@pytest.mark.parametrize("platform", sorted(ACCELERATORS))
def test_jax_platforms_naming_an_absent_accelerator_is_one_line(tmp_path, tfds_dir, teacher_dirs, platform):
    if platform in hardware.present():
        pytest.skip(f"this host has a {ACCELERATORS[platform]}")
    workdir = tmp_path / "run"
    env = dict(tiny_cli_env(), JAX_PLATFORMS=platform)
    proc = subprocess.run(
        tiny_cli(workdir, tfds_dir, teacher_dirs),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    here = ", ".join(hardware.present())
    expected = f"error: JAX_PLATFORMS={platform}: this host has no {ACCELERATORS[platform]}; "
    assert one_line(proc).startswith(f"{expected}the platforms here: {here} (unset JAX_PLATFORMS")
    assert not workdir.exists()


def _analyze(tmp_path, platforms: str) -> subprocess.CompletedProcess:
    """The analyze command line on an exported model under ``JAX_PLATFORMS=platforms``; asserts its output
    directory is not created."""
    model = make_teacher(tmp_path / "model")
    out = tmp_path / "analysis"
    cmd = [
        sys.executable,
        "-m",
        "hybrid_distill_jax.experiments.analyze",
        "--model",
        model,
        "--out",
        str(out),
    ]
    env = dict(tiny_cli_env(), JAX_PLATFORMS=platforms)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not out.exists()
    return proc


def test_the_other_command_lines_refuse_an_absent_accelerator_too(tmp_path):
    if "tpu" in hardware.present():
        pytest.skip("this host has a TPU")
    assert "JAX_PLATFORMS=tpu: this host has no TPU" in one_line(_analyze(tmp_path, "tpu"))


def test_a_backend_jax_cannot_start_is_one_line_naming_jax_platforms(tmp_path):
    line = one_line(_analyze(tmp_path, "cpu,no_such_backend"))
    assert line.startswith("error: JAX_PLATFORMS=cpu,no_such_backend: JAX cannot start it: "), line
    assert "'no_such_backend'" in line and "the platforms here: cpu" in line


def test_an_absent_nvidia_gpu_beside_another_platform_is_passed_over_as_jax_does(monkeypatch):
    """``JAX_PLATFORMS=cuda,cpu`` runs on the CPU where there is no NVIDIA GPU (JAX skips it); an absent
    TPU beside the CPU is refused (JAX fails on it)."""
    here = hardware.present()
    if "cuda" not in here:
        monkeypatch.setattr(hardware, "_requested", lambda: "cuda,cpu")
        hardware.check_platforms()
    if "tpu" not in here:
        monkeypatch.setattr(hardware, "_requested", lambda: "tpu,cpu")
        with pytest.raises(ConfigError, match=r"^JAX_PLATFORMS=tpu,cpu: this host has no TPU; "):
            hardware.check_platforms()


def test_unset_on_a_host_without_accelerators_jax_starts_on_the_cpu_without_plugin_noise():
    """With the accelerator extras installed (the test environment has them), JAX left to itself starts
    the CUDA and TPU plugins, whose failures fill stderr; our command lines point it at the CPU."""
    if hardware.present() != ("cpu",):
        pytest.skip("this host has an accelerator")
    env = {k: v for k, v in tiny_cli_env().items() if k != "JAX_PLATFORMS"}
    lines = ("from hybrid_distill_jax import hardware", "hardware.check_platforms()", "import jax")
    code = "\n".join((*lines, "print(jax.devices())"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "CpuDevice" in proc.stdout, proc.stderr[-2000:]
    for noise in ("Traceback", "cuInit", "libtpu", "TPU_WORKER"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------------- cuDNN attention


@pytest.mark.parametrize("field", ["teachers.deit.attn_impl", "student.attn_impl"])
def test_cudnn_attention_without_an_nvidia_gpu_is_one_line_naming_the_field(
    tmp_path, tfds_dir, teacher_dirs, field
):
    workdir = tmp_path / "run"
    cmd = [*tiny_cli(workdir, tfds_dir, teacher_dirs), f"--config.{field}=cudnn"]
    proc = subprocess.run(cmd, cwd=REPO, env=tiny_cli_env(), capture_output=True, text=True, timeout=300)
    line = one_line(proc)
    assert line.startswith(f"error: {field}='cudnn': cuDNN's fused attention needs an NVIDIA GPU, ")
    assert "this run is built for cpu" in line
    assert not workdir.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="TPU targets need libtpu: make install-aot"
)
def test_a_compile_for_a_tpu_slice_refuses_cudnn_attention_naming_the_field(tmp_path, teachers):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = ["--target=v5e:2x2", *teachers, "--config.teachers.deit.attn_impl=cudnn"]
    # libtpu logs its start-up on a host that is not a TPU VM, in compiles that succeed too: here only the
    # error lines count, as test_compile.py counts them
    line = compile_refuses(args, run_dir, logs=re.compile(r"(?!error: )"))
    assert line.startswith("error: teachers.deit.attn_impl='cudnn': ") and "built for tpu" in line, line


def test_cudnn_attention_is_checked_against_the_platform_the_step_is_built_for(tmp_path, tfds_dir):
    """A trained ``model`` (the other modes) is refused like the student; a deviceless compile checks the
    target's platform, not this host's: cuDNN passes for a GPU target and is refused for a TPU slice."""
    supervised = config_lib.base_config("supervised")
    supervised.model.attn_impl = "cudnn"
    with pytest.raises(ConfigError, match=r"^model\.attn_impl='cudnn': .* built for cpu; "):
        config_lib.validate(supervised, num_devices=1)
    c = tiny_distill_config(tmp_path, tfds_dir)
    c.teachers.mae.attn_impl = "cudnn"
    config_lib.validate(c, num_devices=8, num_processes=1, deviceless=True, platform="cuda")
    with pytest.raises(ConfigError, match=r"^teachers\.mae\.attn_impl='cudnn': .* built for tpu; "):
        config_lib.validate(c, num_devices=8, num_processes=1, deviceless=True, platform="tpu")

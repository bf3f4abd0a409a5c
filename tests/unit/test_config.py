"""Every bad input the core checks up front, each with a one-line error naming the field."""

import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

from hybrid_distill_jax.config_lib import MODES, VALIDATED_MODES, base_config, validate
from hybrid_distill_jax.errors import ConfigError
from tests.helpers import make_teacher, tiny_distill_config


@pytest.fixture
def cfg(tmp_path, tfds_dir):
    return tiny_distill_config(tmp_path, tfds_dir)


def _set(c, dotted, value):
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
        node = node[p]
    with c.unlocked():
        node[leaf] = value


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("masking.stage_ratios", (0.0, 0.5, 1.0), "masking.stage_ratios"),
        ("masking.stage_ratios", (-0.1, 0.2, 0.5), "masking.stage_ratios"),
        ("masking.drop_ratios", (0.2, 1.2, 0.5), "masking.drop_ratios"),
        ("masking.stage_starts", (0.1, 0.3, 0.6), "masking.stage_starts"),
        ("masking.selection", "argmax", "masking.selection"),
        ("masking.mode", "sideways", "masking.mode"),
        ("terms.relation.layers", (0,), "terms.relation.layers"),
        ("terms.relation.layers", (2,), "terms.relation.layers"),  # pico has depth 2: the last block
        ("terms.relation.layers", (7,), "terms.relation.layers"),
        ("terms.feature.loss", "l3", "terms.feature.loss"),
        ("terms.feature.weight", 0.0, None),  # valid: relation-only
        ("image_size", 30, "image_size"),
        ("batch_size", 12, "batch_size"),  # 8 devices
        ("data.name", "no_such_dataset_xyz", "data.name"),
        ("data.crop_scale", (0.5, 0.2), "data.crop_scale"),
        ("teachers.deit.checkpoint", "/nonexistent/teacher", "teachers.deit.checkpoint"),
        ("student.variant", "Q/8", "variant"),
        ("optim.b2", 1.5, "optim.b2 must lie in [0, 1), got 1.5"),
        ("mesh.data", 3, "mesh.data"),
        ("eval.pool", "max", "eval.pool"),
        ("teachers.deit.attn_impl", "flash", "teachers.deit.attn_impl"),
        # on NVIDIA GPUs only (these tests run on the CPU; test_reliability_hardware.py has the rest)
        ("teachers.mae.attn_impl", "cudnn", "teachers.mae.attn_impl='cudnn': cuDNN's fused attention needs"),
        ("student.attn_impl", "flash", "student.attn_impl"),
        ("student.attn_impl", "xla", None),
        ("faults.pause_at", "lunch", "faults.pause_at"),
        ("faults.pause_at", "compile", None),
    ],
)
def test_bad_values_name_their_field(cfg, field, value, expected):
    _set(cfg, field, value)
    if expected is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def test_folder_dataset_without_data_dir(cfg):
    _set(cfg, "data.name", "folder")
    _set(cfg, "data.data_dir", None)
    with pytest.raises(ConfigError, match="data_dir"):
        validate(cfg)
    _set(cfg, "data.data_dir", "/nonexistent/images")
    with pytest.raises(ConfigError, match="data_dir"):
        validate(cfg)


def test_teacher_grid_and_head_mismatches(cfg, tmp_path):
    other_grid = make_teacher(tmp_path / "grid", patch_size=4)
    _set(cfg, "teachers.deit.checkpoint", other_grid)
    with pytest.raises(ConfigError, match="teachers.deit: patch grid 8x8 differs .* 4x4"):
        validate(cfg)
    _set(cfg, "teachers.deit.image_size", 16)  # the fix the message suggests: 16px / patch 4 = 4x4
    validate(cfg)

    heads = make_teacher(tmp_path / "heads", num_heads=4)
    _set(cfg, "teachers.mae.checkpoint", heads)
    with pytest.raises(ConfigError, match="head counts must match"):
        validate(cfg)
    _set(cfg, "terms.relation.weight", 0.0)  # FD-only needs no relation teacher at all
    validate(cfg)


def test_teacher_modes_validate_their_model(tfds_dir):
    c = base_config("mae")
    c.data.name, c.data.data_dir, c.data.eval_split = "embedded_fashion_mnist", tfds_dir, "test"
    c.batch_size = 8
    c.image_size = 32
    c.model.variant = "pico/8"
    c.mae.mask_ratio = 1.0
    with pytest.raises(ConfigError, match="mae.mask_ratio"):
        validate(c)
    c.mae.mask_ratio = 0.75
    c.model.variant = "pico/5"
    with pytest.raises(ConfigError, match="image_size=32 is not divisible by model patch size 5"):
        validate(c)


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_distill_jax.main",
            "--config",
            "configs/demo.py",
            f"--workdir={tmp_path}",
            "--config.teacher_mae.mae.mask_ratio=1.5",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.join(os.path.dirname(__file__), "..", ".."),
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: mae.mask_ratio must lie in (0, 1)" in proc.stderr


# ------------------------------------------------------------- command line: config file and overrides


def _parse(monkeypatch, *args, config="tests/tiny_config.py"):
    """``config_file.parse_flags`` on a fresh set of flags; returns the config or raises ConfigError."""
    from absl import flags

    from hybrid_distill_jax import config_file, main

    argv = ["main", f"--config={config}", "--workdir=/tmp/unused", *args]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    config_file.parse_flags(argv, flag_values)
    return flag_values.config


REPO = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--config.no_such=1"],
            r"^--config\.no_such: no such field in the config; fields there: batch_size, .*, teachers, ",
        ),
        (
            ["--config.data.on_corupt=fail"],
            r"^--config\.data\.on_corupt: .*did you mean --config\.data\.on_corrupt",
        ),
        (
            ["--config.termz.relation.weight=0"],
            r"^--config\.termz\.relation\.weight: .*did you mean --config\.terms\.relation\.weight",
        ),
        (["--config.batch_size=abc"], r"^--config\.batch_size=abc: expected int "),
        (["--config.optim.lr=fast"], r"^--config\.optim\.lr=fast: expected float "),
        (["--config.tensorboard=maybe"], r"^--config\.tensorboard=maybe: expected bool "),
        (
            ["--config.data.crop_scale=(0.2"],
            r"^--config\.data\.crop_scale=\('\(0\.2',\): expected a tuple of numbers",
        ),
        (
            ["--config.masking.stage_ratios=(0.1,"],
            r"^--config\.masking\.stage_ratios=\(0\.1,: expected tuple ",
        ),
        (["--wrkdir=x"], r"Unknown command line flag 'wrkdir'"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_field(monkeypatch, args, expected):
    with pytest.raises(ConfigError) as err:
        _parse(monkeypatch, *args)
    assert re.search(expected, str(err.value)) and "\n" not in str(err.value), str(err.value)


def test_documented_overrides_work(monkeypatch):
    c = _parse(monkeypatch, "--config.data.on_corrupt=fail", "--config.data.crop_scale=(0.3, 1.0)")
    assert c.data.on_corrupt == "fail" and c.data.crop_scale == (0.3, 1.0)


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, r"^--config=.*cfg\.py: no such file$"),
        ("def get_config(:\n", r"^--config=.*cfg\.py: not a valid Python config file: line 1: "),
        ("", r"^--config=.*cfg\.py: defines no get_config\(\) function$"),
        (
            "def get_config():\n    return 1 / 0\n",
            r"^--config=.*cfg\.py: line 2: ZeroDivisionError: division by zero$",
        ),
        (
            "def get_config():\n    return {}\n",
            r"^--config=.*cfg\.py: get_config\(\) returned dict, not a ConfigDict$",
        ),
        (b"\x00\xff\x13binary", r"^--config=.*cfg\.py: not a valid Python config file"),
    ],
)
def test_bad_config_files_are_one_line_naming_the_file(monkeypatch, tmp_path, content, expected):
    path = tmp_path / "cfg.py"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        _parse(monkeypatch, config=str(path))
    assert re.search(expected, str(err.value)), str(err.value)


def test_every_mode_names_a_runner_that_exists():
    """``MODES`` names its runners as text (they live above the config layer): each is a function."""
    for name, mode in MODES.items():
        module, _, function = mode.run.partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), (name, mode.run)


def test_every_config_field_the_docs_name_exists():
    """Each ``config.x.y`` in README.md and docs/*.md is a field of base_config (in some mode) or of an
    ImageNet recipe (``configs/hd*.py``: its own teachers and terms, e.g. ``--config.terms.gram.weight``)."""
    from hybrid_distill_jax.config_file import field_names, load_config_file

    fields = {name for mode in VALIDATED_MODES for name in field_names(base_config(mode))}
    for recipe in sorted(glob.glob(os.path.join(REPO, "configs", "hd*.py"))):
        fields |= set(field_names(load_config_file(recipe)))
    docs = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]
    named = set()
    for path in docs:
        with open(path) as f:
            text = f.read()
        # `config.x.y` / `--config.x.y=...`; not file names (`config.py`, `config.json`), the placeholder
        # `--config.field`
        # or the misspelled example of the 'no such field' message
        pattern = r"(?<![\w/])config\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(?![\w.]|: no such field)"
        for ref in re.findall(pattern, text):
            if ref not in ("py", "json", "field"):
                named.add((os.path.basename(path), ref))
    assert len(named) >= 20  # the docs do name fields: the check below is not vacuous
    missing = sorted(f"{doc}: config.{ref}" for doc, ref in named if ref not in fields)
    assert not missing, missing


def test_every_test_errors_md_names_exists():
    """Each row of docs/ERRORS.md names the test that checks it: those test files and functions exist."""
    with open(os.path.join(REPO, "docs", "ERRORS.md")) as f:
        text = f.read()
    files = {
        os.path.basename(p): p for p in glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True)
    }
    defined = set()
    for path in files.values():
        with open(path) as f:
            defined |= set(re.findall(r"^def (test_\w+)", f.read(), re.M))
    named = set(re.findall(r"(?<![\w.])(test_\w+)(?!\w|\.py)", text))
    assert len(named) >= 30  # the rows do name tests
    missing = sorted(
        {n for n in named if n not in defined}
        | {f for f in re.findall(r"\btest_\w+\.py", text) if f not in files}
    )
    assert not missing, missing


# ------------------------------------------------------------------- numeric fields: each has its range

# Numeric fields for which 0 is a valid setting (for tuples: a valid element); in every other, 0 is out of
# range. Every numeric field is also tried negative (-2: -1 is a sentinel of some), and a float one nan/inf.
ZERO_VALID = {
    "seed", "total_steps", "total_epochs", "checkpoint_every", "optim.lr", "optim.min_lr", "optim.b1",
    "optim.b2", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps", "optim.warmup_epochs",
    "mesh.num_devices", "sharding.fsdp_min_size", "eval.diagnostics_every", "faults.nan_at_step",
    "faults.pause_s", "student.drop_path", "student.mean", "model.drop_path", "model.mean",
    "teachers.deit.image_size", "teachers.mae.image_size", "terms.feature.weight", "terms.relation.weight",
    "terms.feature.teacher_block", "terms.feature.student_block", "terms.feature.drop_prob",
    "terms.relation.drop_prob", "terms.feature.mix_cosine", "terms.feature.mix_smooth_l1",
    "loss.label_smoothing", "masking.stage_starts", "masking.stage_ratios", "masking.drop_ratios",
    "finetune.mixup", "finetune.cutmix", "finetune.mix_prob", "finetune.switch_prob", "data.prefetch",
    "data.max_unreadable_fraction", "ema.decay", "ema.warmup_steps",
}  # fmt: skip
ZERO_VALID_IN_MODE = {"evaluate": {"image_size"}}  # 0 = the model's own resolution


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(c, dotted):
    for key in dotted.split("."):
        c = c[key]
    return c


def _out_of_range(mode: str, name: str, default) -> list:
    """The values of a numeric field (a tuple's first element) that must be refused."""
    first = default[0] if isinstance(default, tuple) else default
    values = [-2 if isinstance(first, int) else -0.5]
    if name not in ZERO_VALID | ZERO_VALID_IN_MODE.get(mode, set()):
        values.append(type(first)(0))
    if isinstance(first, float):
        values += [float("nan"), float("inf")]
    return [(v, *default[1:]) if isinstance(default, tuple) else v for v in values]


@pytest.mark.parametrize("mode", VALIDATED_MODES)
def test_every_numeric_field_refuses_values_outside_its_range(mode, tmp_path, capsys):
    """Every numeric field of base_config(mode), negative, zero where zero is invalid, nan and inf: one
    line naming the field and its range, and exit status 2 from the command line's entry point."""
    from hybrid_distill_jax.config_file import field_names
    from hybrid_distill_jax.main import run_config

    fields = {name: _get(base_config(mode), name) for name in field_names(base_config(mode))}
    numeric = {
        name: value
        for name, value in fields.items()
        if _is_number(value) or (isinstance(value, tuple) and value and all(map(_is_number, value)))
    }
    assert len(numeric) >= 40, sorted(numeric)
    wrong = []
    for name, default in numeric.items():
        for bad in _out_of_range(mode, name, default):
            c = base_config(mode)
            _set(c, name, bad)
            status = run_config(c, str(tmp_path / "run"))
            lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
            said = lines[0].split(", got ")[0] if len(lines) == 1 else repr(lines)
            names_range = re.search(r"[\[(][-\w.]+, [-\w.]+[\])]|[<>]=? ?(-?\d|inf)", said)
            if status != 2 or name not in said or not names_range:
                wrong.append(f"{name}={bad!r}: status {status}, {said}")
    assert not wrong, "\n".join(wrong)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written

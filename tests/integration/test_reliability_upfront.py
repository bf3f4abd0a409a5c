"""Inputs known to be bad before training, refused before it (issue 34, fourth round), through the real
command line: a split the run reads that the dataset lacks, an export directory that cannot be written,
a ``masking.token_multiple`` that rounds a stage's kept count far from its ratio's; and symbolic-link loops
in a folder dataset, which used to stop the run. Each refusal is one line naming the field or file, exit
status 2, no traceback, no training step, and nothing written before it changed."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from hybrid_distill_jax import masking
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.vit import decode_variant
from tests.helpers import REPO, make_teacher, tiny_cli, tiny_cli_env
from tests.integration.test_bad_files import _drop_read_capabilities


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """``tiny_cli_env`` with a compile cache outside the workdirs (kept for the module's later runs)."""
    return dict(tiny_cli_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))


def _folder(root, splits=("train", "test"), per_class=4) -> str:
    """A folder dataset: ``per_class`` 20x20 PNGs in classes a and b of each split."""
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(
                    root / split / cls / f"{i}.png"
                )
    return str(root)


def _command(workdir, teachers, data_dir, *overrides) -> list[str]:
    """``tiny_cli`` reading ``data_dir`` (a TFDS data_dir, or a folder dataset's root), two training steps,
    then ``overrides``."""
    return tiny_cli(workdir, data_dir, teachers) + ["--config.total_steps=2", *overrides]


def _files(*roots) -> dict[str, tuple[bytes, int]]:
    """Every file under ``roots`` (or each root that is a file) -> (its bytes, its mtime)."""
    out = {}
    for root in map(str, roots):
        paths = (
            [root]
            if os.path.isfile(root)
            else [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
        )
        for path in paths:
            with open(path, "rb") as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def _refused(command, env, expected: str, workdir, *watched, preexec_fn=None) -> str:
    """Runs ``command`` over a workdir holding an earlier run's files; asserts exit status 2, one line
    ``error: ...`` starting with ``expected`` (a regular expression), no traceback, no training step (no
    checkpoint, no metrics) and every file there before unchanged, in the workdir and ``watched``; the
    only file the refusal may add is the workdir's lock. Returns the error line."""
    os.makedirs(workdir, exist_ok=True)
    (workdir / "notes.txt").write_text("an earlier run's file\n")
    before = _files(workdir, *watched)
    proc = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match("error: " + expected, errors[0]), errors[0]
    assert not os.path.exists(workdir / "checkpoints") and not os.path.exists(workdir / "metrics.jsonl")
    assert "] step " not in proc.stdout, proc.stdout  # no progress line: no step ran
    after = _files(workdir, *watched)
    assert {p: after.get(p) for p in before} == before
    assert set(after) - set(before) <= {str(workdir / ".lock")}
    return errors[0]


# ------------------------------------------------------------------------------------------------ splits


# What a split's refusal says after "error: config.data.", by case: (the splits there, overrides, message).
SPLITS = {
    "no eval split, evaluated at the end": (
        ("train",),
        ["--config.eval.at_end=true"],
        "eval_split='test': dataset 'folder' in ROOT has no split 'test' (its splits: train); the run reads "
        "it (config.eval.at_end=True): name one of those splits, or set config.eval.at_end=False",
    ),
    "no eval split, diagnostics": (
        ("train",),
        ["--config.eval.diagnostics_every=2"],
        "eval_split='test': dataset 'folder' in ROOT has no split 'test' (its splits: train); the run reads "
        "it (config.eval.diagnostics_every=2): name one of those splits, or set "
        "config.eval.diagnostics_every=0",
    ),
    "no train split": (
        ("test",),
        [],
        "train_split='train': dataset 'folder' in ROOT has no split 'train' (its splits: test); training "
        "reads it",
    ),
}


@pytest.mark.parametrize("case", list(SPLITS))
def test_a_split_the_run_reads_is_refused_before_training_when_missing(tmp_path, teachers, cli_env, case):
    """A folder dataset without the eval split trained to its end, then failed on config.data.eval_split;
    without the train split it ended in a KeyError traceback."""
    splits, overrides, expected = SPLITS[case]
    root = _folder(tmp_path / "images", splits)
    _refused(
        _command(tmp_path / "run", teachers, root, "--config.data.name=folder", *overrides),
        cli_env,
        re.escape("config.data." + expected.replace("ROOT", root)) + "$",
        tmp_path / "run",
        root,
    )


# ----------------------------------------------------------------------------------------------- exports


EXPORTS = {
    # case: (what to make under tmp_path, export_dir override or None, the error's text after 'error: ')
    "export_dir is a file": ("file", "out", "export_dir='TMP/out': TMP/out exists and is not a directory"),
    "export_dir under a file": (
        "file",
        "out/export",
        "export_dir='TMP/out/export': TMP/out/export is under TMP/out, which is not a directory",
    ),
    "the default export_dir is a file": (
        "file",
        None,
        "export_dir='' (WORKDIR/export): TMP/run/export exists and is not a directory",
    ),
    "ema.export='both': the online export is a file": (
        "file",
        "out",
        "export_dir='TMP/out': TMP/out_online exists and is not a directory",
    ),
    "export_dir not writable": (
        "read-only folder",
        "out/export",
        r"export_dir='TMP/out/export': TMP/out/export cannot be written (TMP/out: Permission denied)",
    ),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_an_export_dir_that_cannot_be_written_is_refused_before_training(
    tmp_path, tfds_dir, teachers, cli_env, case
):
    """Such a run trained to its end and then failed with 'File exists' (or 'Permission denied')."""
    made, export, expected = EXPORTS[case]
    overrides, preexec_fn = [], None
    if export is not None:
        overrides.append(f"--config.export_dir={tmp_path / export}")
    if case.startswith("ema.export='both'"):
        overrides += ["--config.ema.decay=0.5", "--config.ema.export=both"]
        blocker = tmp_path / "out_online"
    elif export is None:
        blocker = tmp_path / "run" / "export"
    else:
        blocker = tmp_path / "out"
    os.makedirs(blocker.parent, exist_ok=True)
    if made == "file":
        blocker.write_text("an earlier file, not a directory\n")
    else:
        blocker.mkdir()
        (blocker / "kept.txt").write_text("already there\n")
        blocker.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere, unless it gives up overriding permissions
            preexec_fn = _drop_read_capabilities
    try:
        _refused(
            _command(tmp_path / "run", teachers, tfds_dir, *overrides),
            cli_env,
            re.escape(expected.replace("TMP", str(tmp_path))) + "$",
            tmp_path / "run",
            blocker,
            preexec_fn=preexec_fn,
        )
    finally:
        blocker.chmod(0o755)


# ------------------------------------------------------------------------------------------ token_multiple


def test_a_token_multiple_that_rounds_a_stage_far_from_its_ratio_is_refused(
    tmp_path, tfds_dir, teachers, cli_env
):
    """The tiny config's 16 patches keep 12 and 8 (mask ratios 0.25, 0.5): 16 left 1 patch, with no word."""
    _refused(
        _command(tmp_path / "run", teachers, tfds_dir, "--config.masking.token_multiple=16"),
        cli_env,
        re.escape(
            "masking.token_multiple=16: the stage with masking.stage_ratios 0.25 would keep 1 of its 12 "
            "patches (CLS + K rounded down to a multiple of 16), losing more than 25% of them; use 4 or less "
            "for 16 patches, or 1 (off)"
        )
        + "$",
        tmp_path / "run",
    )


def _method_doc() -> tuple[str, dict[str, tuple[str, str]]]:
    """docs/METHOD.md's text, and its token_multiple table: each row's first cell -> its two others."""
    with open(os.path.join(REPO, "docs", "METHOD.md")) as f:
        text = f.read()
    rows = {}
    for line in text[text.index("| `masking.token_multiple` |") :].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3:
            break
        rows[cells[0]] = (cells[1], cells[2])
    return text, rows


def _kept(mcfg, num_patches: int, depth: int, multiple: int) -> tuple[str, str]:
    """What each stage keeps over training and over depth under ``multiple``, as the table writes it:
    'N, N, N', or 'refused (N, N, N)' when the plan refuses the multiple."""
    cells = []
    for mode, field in (("over_training", "stage_ratios"), ("over_depth", "drop_ratios")):
        mcfg = mcfg.copy_and_resolve_references()
        mcfg.mode, mcfg.token_multiple = mode, multiple
        counts = ", ".join(str(masking.keep_count(num_patches, r, multiple)) for r in mcfg[field])
        try:
            masking.keep_plan(mcfg, num_patches, depth)
        except ConfigError as e:
            assert str(e).startswith(f"masking.token_multiple={multiple}: "), e
            counts = f"refused ({counts})"
        cells.append(counts)
    return cells[0], cells[1]


def test_the_token_multiple_table_in_method_md_is_the_codes():
    """What each stage of the B/16 224 px recipe keeps, or that it is refused, for each token_multiple in
    docs/METHOD.md's table (the documented example values among them), computed by the plans themselves;
    and the 448 px counts quoted for 128."""
    import importlib.util

    path = os.path.join(REPO, "configs", "hd_vitb16_deit_mae.py")
    spec = importlib.util.spec_from_file_location("recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config()
    arch = decode_variant(config.student.variant)
    num_patches = (config.image_size // arch["patch_size"]) ** 2
    text, rows = _method_doc()
    assert {"1 (off)", "8", "16", "128"} <= set(rows)
    for first, documented in rows.items():
        multiple = 1 if first == "1 (off)" else int(first)
        assert _kept(config.masking, num_patches, arch["depth"], multiple) == documented, first
    big = (448 // arch["patch_size"]) ** 2
    over_training, over_depth = _kept(config.masking, big, arch["depth"], 128)
    quoted = f"448 px ({big} patches) keeps {over_training} over training and {over_depth} over depth"
    assert quoted in " ".join(text.split())  # as the paragraph's lines fall


# ------------------------------------------------------------------------------------- symbolic-link loops


def _looping_folder(root) -> tuple[str, str]:
    """A folder dataset with a file that links to itself (``train/a/loop.png``), folders that link to
    their own or a parent folder at each level (a split, a class, inside a class) and one that links to
    itself. Returns (its root, the looping file)."""
    _folder(root)
    loop = root / "train" / "a" / "loop.png"
    os.symlink("loop.png", loop)
    os.symlink(".", root / "again")  # a split folder that is the root
    os.symlink("..", root / "train" / "up")  # a class folder that is the root
    os.symlink("self", root / "train" / "self")
    os.symlink("..", root / "train" / "a" / "up")
    return str(root), str(loop)


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_symbolic_link_loops_in_a_folder_dataset_do_not_stop_the_run(tmp_path, teachers, cli_env, policy):
    """They used to end the listing with 'Too many levels of symbolic links', or list the dataset again as
    a split of itself. A looping file is an unreadable file (data.on_corrupt); looping folders are skipped
    with a warning."""
    root, loop = _looping_folder(tmp_path / "images")
    command = _command(
        tmp_path / "run", teachers, root, "--config.data.name=folder", f"--config.data.on_corrupt={policy}"
    )
    proc = subprocess.run(command, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for folder in ("again", "train/up", "train/self"):
        assert f"skipping {root}/{folder}, a symbolic link that loops" in proc.stderr, proc.stderr[-3000:]
    if policy == "skip":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipping unreadable image {loop}" in proc.stderr
    else:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert errors[0].startswith(f"error: unreadable image {loop} (config.data.on_corrupt='fail'"), errors[
            0
        ]

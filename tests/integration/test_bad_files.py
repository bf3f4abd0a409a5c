"""Every kind of file the program reads, damaged in every way: one line naming the file, exit 2, no traceback.

The table applies each corruption (``CORRUPTIONS``) to each kind of file (``KINDS``) in a fresh copy of an
intact fixture, then runs the same entry point the command line runs (``main.run_config``, the flag parser,
the converter's ``main``) in this process. An intact copy of every kind must run cleanly (the control).
As root, permission bits do not stop reads, so the ``unreadable`` column runs in one subprocess without
the capabilities that let root read anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH). The prepared TFDS
dataset's own files (``DATASET_KINDS``: its ``dataset_info.json`` and record shards, read by TFDS and tf.data)
have a table of their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from tests.helpers import REPO

WRONG_KIND_TEXT = b'{"this": "is a JSON file, not the kind of file expected here"}\n'


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    cut = int(np.random.default_rng(len(data)).integers(1, len(data)))  # a seeded byte in the middle
    open(path, "wb").write(data[:cut])


def _random_bytes(path: str) -> None:
    size = max(os.path.getsize(path), 64)
    open(path, "wb").write(np.random.default_rng(size).bytes(size))


def _directory(path: str) -> None:
    os.remove(path)
    os.makedirs(path)
    open(os.path.join(path, "unrelated.txt"), "w").write("x")


CORRUPTIONS: dict[str, Callable[[str], None]] = {
    "missing": os.remove,
    "empty": lambda p: open(p, "wb").close(),
    "truncated": _truncate,
    "random_bytes": _random_bytes,
    "directory": _directory,
    "unreadable": lambda p: os.chmod(p, 0),
    "wrong_kind": lambda p: open(p, "wb").write(WRONG_KIND_TEXT),
}


# --------------------------------------------------------------------------------------------- fixtures


def prepare(root: str, tfds_dir: str) -> None:
    """Intact inputs of every kind under ``root`` (teachers, a checkpointed run, data, converter inputs)."""
    from hybrid_distill_jax.main import run_config
    from hybrid_distill_jax.teachers.importer import export_timm
    from tests.helpers import make_teacher

    make_teacher(os.path.join(root, "teachers", "deit"), seed=1)
    make_teacher(os.path.join(root, "teachers", "mae"), seed=2)
    shutil.copytree(
        os.path.join(tfds_dir, "embedded_fashion_mnist"), os.path.join(root, "data", "embedded_fashion_mnist")
    )
    shutil.copy(os.path.join(REPO, "tests", "tiny_config.py"), os.path.join(root, "config.py"))
    os.makedirs(os.path.join(root, "convert"))
    for suffix in ("safetensors", "pth"):
        export_timm(
            os.path.join(root, "teachers", "deit"),
            os.path.join(root, "convert", f"vit.{suffix}"),
            log=lambda *_: None,
        )
    run = _distill_config(root)
    assert run_config(run, os.path.join(root, "run")) == 0


def _distill_config(root: str, data_root: str | None = None):
    from hybrid_distill_jax.config_lib import base_config
    from tests.helpers import ARCH, tiny_common

    c = tiny_common(base_config("distill"), os.path.join(data_root or root, "data"), steps=2, batch=8)
    c.student.update(ARCH)
    c.checkpoint_every = 2
    for name in ("deit", "mae"):
        c.teachers[name].checkpoint = os.path.join(root, "teachers", name)
        c.teachers[name].dtype = "float32"
    return c


def _evaluate_config(model_dir: str, data_dir: str):
    from hybrid_distill_jax.config_lib import base_config

    c = base_config("evaluate")
    c.model_dir = model_dir
    c.data.update(
        dict(name="embedded_fashion_mnist", data_dir=data_dir, train_split="train", eval_split="test")
    )
    c.eval.update(dict(linear=False, diagnostics=False, max_train=64, max_test=32, batch_size=32, knn_k=5))
    return c


# ------------------------------------------------------------------------------------------ file kinds


def _cli(entry: Callable[[], int]) -> tuple[int | str, str]:
    """Exit status and stderr of ``entry``; an exception that escapes it is reported as 'traceback'."""
    err = io.StringIO()
    # Only the table's in-process harness: orbax's background callbacks of earlier (failed) runs in this
    # process report "Event loop is closed" through sys.unraisablehook; a command-line run is alone.
    with contextlib.redirect_stderr(err), _ignoring_unraisable():
        try:
            status = entry()
        except SystemExit as e:
            status = e.code
        except Exception as e:  # noqa: BLE001 - exactly what the table looks for
            return "traceback", f"{type(e).__name__}: {e}"
    return status, err.getvalue()


@contextlib.contextmanager
def _ignoring_unraisable():
    saved, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = saved


def _run_config(config, workdir):
    from hybrid_distill_jax.main import run_config

    return _cli(lambda: run_config(config, workdir))


def _config_file(case: str, root: str):
    from absl import flags

    from hybrid_distill_jax import config_file, main

    path = os.path.join(case, "config.py")
    argv = ["main", f"--config={path}", f"--workdir={case}/w"]
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    saved, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv
    try:

        def entry():
            config_file.parse_flags_or_exit(argv, flag_values)
            return 0

        return _cli(entry)
    finally:
        sys.argv = saved


def _teacher(case: str, root: str):
    return _run_config(_distill_config(case, data_root=root), os.path.join(case, "w"))


def _checkpoint(case: str, root: str):
    return _run_config(_distill_config(root), os.path.join(case, "run"))


def _dataset(case: str, root: str):
    return _run_config(_distill_config(root, data_root=case), os.path.join(case, "w"))


def _convert_import(suffix: str):
    def run(case: str, root: str):
        from hybrid_distill_jax.teachers.__main__ import main as convert_main

        path = os.path.join(case, "convert", f"vit.{suffix}")
        argv = ["import", "--family", "timm", "--input", path, "--heads", "2", "--output", f"{case}/out"]
        argv += ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]
        with contextlib.redirect_stdout(io.StringIO()):
            return _cli(lambda: convert_main(argv))

    return run


def _evaluate(case: str, root: str):
    config = _evaluate_config(os.path.join(case, "teachers", "deit"), os.path.join(root, "data"))
    with contextlib.redirect_stdout(io.StringIO()):
        return _run_config(config, os.path.join(case, "w"))


@dataclasses.dataclass(frozen=True)
class Kind:
    copy: str  # the fixture folder copied into each case
    target: str  # the file damaged in the copy (a glob: its largest match)
    run: Callable[[str, str], tuple[int | str, str]]  # (case dir, fixture root) -> (status, stderr)
    named: str = ""  # what the message must name, when not the file itself (relative to the case)
    # Output that must equal the intact run's when a damaged file still lets the run succeed (bytes the
    # program never reads were lost; e.g. the tail of an orbax data file).
    same_output: str = ""


_CHECKPOINT = dict(
    copy="run", run=_checkpoint, named="run/checkpoints", same_output="run/export/params.msgpack"
)
KINDS = {
    "config file": Kind("config.py", "config.py", _config_file),
    "teacher model.json": Kind("teachers", "teachers/deit/model.json", _teacher),
    "teacher params.msgpack": Kind("teachers", "teachers/mae/params.msgpack", _teacher),
    "checkpoint tree metadata": Kind(target="run/checkpoints/2/state/_METADATA", **_CHECKPOINT),
    "checkpoint manifest": Kind(target="run/checkpoints/2/state/manifest.ocdbt", **_CHECKPOINT),
    "checkpoint array data": Kind(target="run/checkpoints/2/state/ocdbt.process_0/d/*", **_CHECKPOINT),
    "checkpoint run metadata": Kind(target="run/checkpoints/2/meta/metadata", **_CHECKPOINT),
    "converter input .safetensors": Kind(
        "convert", "convert/vit.safetensors", _convert_import("safetensors")
    ),
    "converter input .pth": Kind("convert", "convert/vit.pth", _convert_import("pth")),
    "evaluate model.json": Kind("teachers", "teachers/deit/model.json", _evaluate),
    "evaluate params.msgpack": Kind("teachers", "teachers/deit/params.msgpack", _evaluate),
}
# Read by TensorFlow/TFDS inside data/ (sources.py, pipeline.py).
DATASET_KINDS = {
    "dataset info": Kind("data", "data/embedded_fashion_mnist/1.0.0/dataset_info.json", _dataset),
    "dataset records": Kind("data", "data/embedded_fashion_mnist/1.0.0/*train.tfrecord*", _dataset),
}


def check(root: str, kind: Kind, corruption: str | None, case: str) -> str:
    """Runs one cell of the table in ``case``; '' when it behaves, else what went wrong."""
    src = os.path.join(root, kind.copy)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(case, kind.copy))
    target = max(glob.glob(os.path.join(case, kind.target)), key=os.path.getsize)
    if corruption is not None:
        CORRUPTIONS[corruption](target)
    status, err = kind.run(case, root)
    if corruption is None:
        return "" if status == 0 else f"intact input failed: {status}: {err[-800:]}"
    if status == 0 and kind.same_output:
        same = _read(os.path.join(case, kind.same_output)) == _read(os.path.join(root, kind.same_output))
        return "" if same else "exit 0 with a different result"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    named = os.path.join(case, kind.named) if kind.named else target
    problems = []
    if status != 2:
        problems.append(f"exit {status}")
    if len(errors) != 1 or "Traceback" in err:
        problems.append(f"{len(errors)} error lines")
    elif named not in errors[0] and os.path.relpath(named, case) not in errors[0]:
        problems.append("file not named")
    return f"{', '.join(problems)}: {err.strip()[-600:]}" if problems else ""


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run_table(root: str, work: str, corruptions, kinds=None) -> dict[str, str]:
    """{'kind / corruption': problem} of every cell that misbehaves (empty: all pass)."""
    failures = {}
    for name, kind in (kinds or KINDS).items():
        for corruption in corruptions:
            case = os.path.join(work, f"{name}-{corruption}".replace(" ", "_"))
            os.makedirs(case)
            problem = check(root, kind, corruption, case)
            if problem:
                failures[f"{name} / {corruption}"] = problem
    return failures


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory, tfds_dir):
    root = str(tmp_path_factory.mktemp("intact"))
    prepare(root, tfds_dir)
    return root


def test_every_file_kind_intact_runs(fixture_root, tmp_path):
    assert run_table(fixture_root, str(tmp_path), [None], {**KINDS, **DATASET_KINDS}) == {}


def _corruptions() -> list[str]:
    return [c for c in CORRUPTIONS if c != "unreadable" or not _root_reads_anything()]


def test_every_corruption_of_every_file_kind_is_one_line_and_exit_2(fixture_root, tmp_path):
    failures = run_table(fixture_root, str(tmp_path), _corruptions())
    assert failures == {}, json.dumps(failures, indent=1)


def test_every_corruption_of_dataset_files_is_one_line_and_exit_2(fixture_root, tmp_path):
    failures = run_table(fixture_root, str(tmp_path), _corruptions(), DATASET_KINDS)
    assert failures == {}, json.dumps(failures, indent=1)


@pytest.mark.skipif("not _root_reads_anything()", reason="covered in-process by the test above")
def test_unreadable_files_as_root_without_read_capabilities(fixture_root, tmp_path):
    script = (
        "import json, sys; from tests.integration import test_bad_files as t; "
        "kinds = {**t.KINDS, **t.DATASET_KINDS}; "
        "print(json.dumps(t.run_table(sys.argv[1], sys.argv[2], ['unreadable'], kinds)))"
    )
    env = dict(
        os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, fixture_root, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_drop_read_capabilities,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == {}, json.dumps(failures, indent=1)


def _root_reads_anything() -> bool:
    return os.geteuid() == 0


def _drop_read_capabilities() -> None:
    """In the child before exec: without these two capabilities, root obeys permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

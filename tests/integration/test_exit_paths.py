"""Every exit status of a training run (0, 2, 3, 75, 130) through the real command line, each reached while
the checkpoint writer, the input pipeline's thread and the signal watchdog are running: the status, and no
traceback from any of them on the way out (a stopped run used to print 'RuntimeError: cannot schedule new
futures after shutdown' from orbax's writer, and lose the checkpoint it was writing).
"""

import os
import signal
import subprocess
import time

import pytest

from hybrid_distill_jax.train import checkpoint as checkpoint_lib
from tests.helpers import REPO, make_teacher, tiny_cli, tiny_cli_env
from tests.integration.test_data_faults import GARBAGE, _folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tfds_dir):
    root = tmp_path_factory.mktemp("exits")
    teachers = [make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)]
    env = dict(tiny_cli_env(), JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"))
    return tfds_dir, teachers, env


def _run(setup, workdir, overrides, sig=None) -> tuple[int, str]:
    """Runs the tiny distillation in ``workdir``; with ``sig``, sends it once the first step is done."""
    tfds_dir, teachers, env = setup
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "stderr.txt")
    if sig is not None:
        overrides = [*overrides, "--config.faults.pause_at=train", "--config.faults.pause_s=600"]
    command = [*tiny_cli(workdir, tfds_dir, teachers), *overrides]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        if sig is not None:
            deadline = time.monotonic() + 240
            while "fault injection: pausing at train" not in open(log).read():
                assert proc.poll() is None and time.monotonic() < deadline, open(log).read()[-3000:]
                time.sleep(0.1)
            proc.send_signal(sig)
        status = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return status, open(log).read()


def _steps(workdir) -> list[int]:
    return sorted(checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=0).all_steps())


def test_finished(setup, tmp_path):
    status, err = _run(setup, tmp_path, [])
    assert status == 0 and _steps(tmp_path) == [10, 12], err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


def test_data_error_from_the_input_thread_mid_run(setup, tmp_path):
    """The input pipeline's thread meets the third unreadable image of 28 (data.max_unreadable_fraction)."""
    images = _folder(tmp_path / "images", good=24, bad={i: GARBAGE for i in (3, 9, 15, 21)})
    folder = ["--config.data.name=folder", f"--config.data.data_dir={images}", "--config.checkpoint_every=1"]
    status, err = _run(setup, tmp_path / "run", folder)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and "unreadable" in errors[0], err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


def test_nonfinite_stop(setup, tmp_path):
    """The reported case: exit 3 as documented, then tracebacks from orbax's writer at shutdown, and the
    checkpoint of step 2, still being written, lost. Now it is finished first."""
    status, err = _run(setup, tmp_path, ["--config.nonfinite_policy=stop", "--config.faults.nan_at_step=3"])
    assert status == 3 and "NonFiniteError: non-finite loss or gradient at step 4" in err, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert _steps(tmp_path) == [2]


@pytest.mark.parametrize(
    "sig,status", [(signal.SIGTERM, 75), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_after_a_step(setup, tmp_path, sig, status):
    code, err = _run(setup, tmp_path, [], sig)
    assert code == status and _steps(tmp_path) == [1], err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]

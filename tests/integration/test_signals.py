"""SIGTERM and SIGINT in every phase of a run: the documented status (75, 130) within 30 s, no traceback,
and a checkpoint exactly when a training step completed since the last one.

``config.faults.pause_at`` holds a run at a phase (start-up, data preparation, compilation, after the first
training step, export, evaluation) and says so on stderr; the test then sends the signal.
"""

import os
import signal
import subprocess
import time

import pytest

from hybrid_distill_jax.train import checkpoint as checkpoint_lib
from tests.helpers import REPO, make_teacher, tiny_cli

STATUS = {signal.SIGTERM: 75, signal.SIGINT: 130}
EXIT_WITHIN_S = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tfds_dir):
    root = tmp_path_factory.mktemp("signals")
    teachers = [make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),  # later runs skip XLA compilation
    )
    return tfds_dir, teachers, env


def _launch(setup, workdir, *overrides):
    tfds_dir, teachers, env = setup
    command = [*tiny_cli(workdir, tfds_dir, teachers), "--config.total_steps=4", *overrides]
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "stderr.txt"), "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _stderr(workdir) -> str:
    with open(os.path.join(workdir, "stderr.txt")) as f:
        return f.read()


def _stop(proc, sig, workdir) -> int:
    """Sends ``sig``; the exit status, which must come within EXIT_WITHIN_S seconds."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {EXIT_WITHIN_S} s after {sig.name}: {_stderr(workdir)[-2000:]}")


def _signal_at(setup, workdir, phase, sig, *overrides) -> str:
    """Holds a run at ``phase``, sends ``sig``, checks the status; returns stderr."""
    proc = _launch(
        setup, workdir, f"--config.faults.pause_at={phase}", "--config.faults.pause_s=600", *overrides
    )
    deadline = time.monotonic() + 300
    while f"fault injection: pausing at {phase}" not in _stderr(workdir):
        assert proc.poll() is None, f"ended before {phase}: {_stderr(workdir)[-3000:]}"
        assert time.monotonic() < deadline, f"never reached {phase}"
        time.sleep(0.1)
    status = _stop(proc, sig, workdir)
    err = _stderr(workdir)
    assert status == STATUS[sig], f"{phase}/{sig.name}: status {status}: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return err


def _checkpoints(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(checkpoint_lib.Checkpointer(directory, every=0).all_steps())


@pytest.mark.parametrize(
    "phase,sig",
    [("startup", signal.SIGINT), ("data", signal.SIGTERM), ("compile", signal.SIGINT)],
)
def test_signal_before_any_step_exits_at_once_without_checkpoint(setup, tmp_path, phase, sig):
    err = _signal_at(setup, tmp_path, phase, sig)
    assert "no training progress to checkpoint" in err
    assert _checkpoints(tmp_path) == []


def test_signal_after_a_step_checkpoints_it_and_later_phases_resume(setup, tmp_path):
    # After the first step (checkpoint_every=2): the step is checkpointed before exiting.
    err = _signal_at(setup, tmp_path, "train", signal.SIGTERM)
    assert "Preempted: preempted: checkpoint written at step 1" in err
    assert _checkpoints(tmp_path) == [1]
    # Rerun: resumes at 1, trains to 4, and is stopped in export: the final checkpoint is already on disk.
    err = _signal_at(setup, tmp_path, "export", signal.SIGINT)
    assert "resumed from" in err and _checkpoints(tmp_path) == [2, 4]
    # Rerun: nothing left to train; stopped in the final evaluation.
    _signal_at(setup, tmp_path, "eval", signal.SIGTERM, "--config.eval.at_end=true")
    assert _checkpoints(tmp_path) == [2, 4]
    done = _launch(setup, tmp_path).wait(timeout=300)
    assert done == 0 and os.path.exists(tmp_path / "export" / "params.msgpack"), _stderr(tmp_path)[-3000:]


def test_sigint_after_a_step_checkpoints_it_and_exits_130(setup, tmp_path):
    err = _signal_at(setup, tmp_path, "train", signal.SIGINT)
    assert "interrupted (SIGINT): checkpoint written at step 1" in err
    assert _checkpoints(tmp_path) == [1]


@pytest.mark.parametrize("sig,after_s", [(signal.SIGINT, 1.5), (signal.SIGTERM, 4.0)])
def test_signal_while_importing_exits_with_its_status(setup, tmp_path, sig, after_s):
    """No pause: the signal lands wherever start-up is (importing JAX/TensorFlow, loading the config)."""
    proc = _launch(setup, tmp_path)
    time.sleep(after_s)
    assert proc.poll() is None, _stderr(tmp_path)[-3000:]
    status = _stop(proc, sig, tmp_path)
    assert status == STATUS[sig], _stderr(tmp_path)[-3000:]
    assert "Traceback" not in _stderr(tmp_path)

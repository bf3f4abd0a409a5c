"""SIGTERM, SIGINT and SIGHUP in every phase of a run: the documented status (75, 130, 129) within 30 s, no
traceback, a checkpoint exactly when a training step completed since the last one, and every file written
before the signal kept (docs/ERRORS.md, "Signals by phase": each cell of its table is a case here).

``config.faults.pause_at`` holds a run at a phase and says so on stderr; the test then sends the signal.
Each case of the table runs in a copy of a workdir prepared once: a tiny distillation stopped after its
first step (checkpoint 1) for the phases up to the stage recompilation, the same run finished (export,
eval.json) for the export and the final evaluation, and a demo whose first teacher is trained for the
demo's stages. The runs share one compilation cache, so only the preparations compile.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hybrid_distill_jax import signals
from hybrid_distill_jax.train import checkpoint as checkpoint_lib
from tests.helpers import REPO, make_teacher, tiny_cli, tiny_cli_env

STATUS = {signal.SIGTERM: 75, signal.SIGINT: 130, signal.SIGHUP: 129}
EXIT_WITHIN_S = 30
# Four steps, the second masking stage from step 2, no periodic checkpoint: every checkpoint after the
# first run's is the final one or a signal's. A small final evaluation.
TINY = (
    "--config.total_steps=4",
    "--config.checkpoint_every=0",
    "--config.eval.at_end=true",
    "--config.eval.max_train=256",
    "--config.eval.max_test=256",
    "--config.eval.linear_epochs=1",
)
# phase -> (the prepared workdir a case starts from, the step a signal there checkpoints, or None)
PHASES = {
    "startup": ("stopped", None),
    "data": ("stopped", None),
    "compile": ("stopped", None),
    "train": ("stopped", 2),  # after the first step of the resumed run
    "recompile": ("stopped", 3),  # step 2, the second stage's first: compiled, run, then checkpointed
    "export": ("finished", None),
    "eval": ("finished", None),
}
# The tiny run of TINY through ``train()`` in a script: argv = workdir, data_dir, the two teachers.
LIBRARY_RUN = f"""
import sys
from hybrid_distill_jax.config_file import load_config_file
from hybrid_distill_jax.train import train
c = load_config_file({os.path.join(REPO, "tests", "tiny_config.py")!r})
c.total_steps, c.checkpoint_every, c.data.data_dir = 4, 0, sys.argv[2]
c.teachers.deit.checkpoint, c.teachers.mae.checkpoint = sys.argv[3:5]
c.eval.update(dict(at_end=True, max_train=256, max_test=256, linear_epochs=1))
c.faults.update(dict(pause_at="eval", pause_s=600.0))
train(c, sys.argv[1])
"""
# The demo at its smallest: the first teacher trains 2 steps and evaluates on few images.
DEMO = tuple(
    f"--config.teacher_supervised.{field}"
    for field in ("total_steps=2", "eval.max_train=256", "eval.max_test=256", "eval.linear_epochs=1")
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tfds_dir):
    root = tmp_path_factory.mktemp("signals")
    teachers = [make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)]
    env = dict(tiny_cli_env(), JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"))
    return tfds_dir, teachers, env, root


def _tiny(setup, workdir, *overrides) -> list[str]:
    tfds_dir, teachers, _, _ = setup
    return [*tiny_cli(workdir, tfds_dir, teachers), *TINY, *overrides]


def _demo(setup, workdir) -> list[str]:
    """The demo held at the start of its second stage (the MAE teacher's)."""
    config = os.path.join(REPO, "configs", "demo.py") + ":smoke"
    return [
        *(sys.executable, "-m", "hybrid_distill_jax.main", "--config", config, f"--workdir={workdir}"),
        *(f"--config.{stage}.data.data_dir={setup[0]}" for stage in ("teacher_supervised", "teacher_mae")),
        *DEMO,
        "--config.teacher_mae.faults.pause_at=stage",
        "--config.teacher_mae.faults.pause_s=600",
    ]


def _launch(setup, workdir, command):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "stderr.txt"), "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=setup[2], stdout=subprocess.DEVNULL, stderr=log)


def _stderr(workdir) -> str:
    with open(os.path.join(workdir, "stderr.txt")) as f:
        return f.read()


def _signal_at(setup, workdir, command, phase, sig) -> str:
    """Runs ``command`` until it pauses at ``phase``, sends ``sig``, checks the status (within
    EXIT_WITHIN_S seconds) and that no traceback was printed; returns stderr."""
    if signal.getsignal(sig) is signal.SIG_IGN:
        pytest.skip(f"{sig.name} is ignored here (nohup?), so the runs started here would ignore it too")
    proc = _launch(setup, workdir, command)
    try:
        deadline = time.monotonic() + 300
        while f"fault injection: pausing at {phase}" not in _stderr(workdir):
            assert proc.poll() is None, f"ended before {phase}: {_stderr(workdir)[-3000:]}"
            assert time.monotonic() < deadline, f"never reached {phase}"
            time.sleep(0.1)
        proc.send_signal(sig)
        status = proc.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_WITHIN_S} s after {sig.name}: {_stderr(workdir)[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = _stderr(workdir)
    assert status == STATUS[sig], f"{phase}/{sig.name}: status {status}: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return err


def _checkpoints(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(checkpoint_lib.Checkpointer(directory, every=0).all_steps())


def _files(workdir) -> dict[str, bytes]:
    """Every file under ``workdir`` and its contents, but the locks (they name the live process) and the
    test's log."""
    files = {}
    for parent, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, workdir)
            if name != ".lock" and relative != "stderr.txt":
                with open(path, "rb") as f:
                    files[relative] = f.read()
    return files


def _assert_kept(before: dict[str, bytes], workdir) -> None:
    """Every file of ``before`` is still in ``workdir``, unchanged. Two are rewritten by every run, by
    design: config.json holds the run's own config (only ``faults``, this run's pause, differs here), and
    metrics.jsonl is cut back to the resumed checkpoint's step, then continued."""
    after = _files(workdir)
    for path, data in before.items():
        assert path in after, f"{path} was removed"
        if os.path.basename(path) == "config.json":
            old, new = json.loads(data), json.loads(after[path])
            del old["faults"], new["faults"]
            assert old == new, path
        elif os.path.basename(path) == "metrics.jsonl":
            assert after[path].startswith(data), path
        else:
            assert after[path] == data, f"{path} changed"


@pytest.fixture(scope="module")
def stopped(setup):
    """A tiny distillation stopped by SIGTERM after its first step: checkpoint 1."""
    workdir = setup[3] / "stopped"
    command = _tiny(setup, workdir, "--config.faults.pause_at=train", "--config.faults.pause_s=600")
    err = _signal_at(setup, workdir, command, "train", signal.SIGTERM)
    assert "Preempted: preempted: checkpoint written at step 1" in err
    assert _checkpoints(workdir) == [1]
    return workdir


@pytest.fixture(scope="module")
def finished(setup, stopped):
    """The same run resumed and finished: checkpoints 1 and 4, the export and eval.json."""
    workdir = setup[3] / "finished"
    shutil.copytree(stopped, workdir)
    status = _launch(setup, workdir, _tiny(setup, workdir)).wait(timeout=300)
    assert status == 0, _stderr(workdir)[-3000:]
    assert _checkpoints(workdir) == [1, 4]
    assert os.path.exists(workdir / "export" / "params.msgpack") and os.path.exists(workdir / "eval.json")
    return workdir


@pytest.fixture(scope="module")
def demo(setup):
    """A demo stopped by SIGTERM at the start of its second stage: the first teacher trained."""
    workdir = setup[3] / "demo"
    _signal_at(setup, workdir, _demo(setup, workdir), "stage", signal.SIGTERM)
    assert os.path.exists(workdir / "teacher_supervised" / "eval.json")
    return workdir


@pytest.mark.parametrize("sig", list(STATUS), ids=lambda s: s.name)
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_in_each_phase_exits_with_its_status_and_keeps_what_was_written(
    setup, stopped, finished, tmp_path, phase, sig
):
    # Both preparations, whichever the case starts from: the finished run also compiled the second
    # stage's step into the shared cache, so the recompilation cases end within the grace period.
    prepared, checkpointed = PHASES[phase]
    workdir = tmp_path / "run"
    shutil.copytree(stopped if prepared == "stopped" else finished, workdir)
    steps, before = _checkpoints(workdir), _files(workdir)
    command = _tiny(setup, workdir, f"--config.faults.pause_at={phase}", "--config.faults.pause_s=600")
    err = _signal_at(setup, workdir, command, phase, sig)
    _assert_kept(before, workdir)
    if checkpointed is None:
        assert f"{sig.name} during {signals.PHASES[phase]}: no training progress to checkpoint" in err
        assert _checkpoints(workdir) == steps
    else:
        assert f"checkpoint written at step {checkpointed} " in err
        assert _checkpoints(workdir) == [*steps, checkpointed]


@pytest.mark.parametrize("sig", list(STATUS), ids=lambda s: s.name)
def test_a_signal_between_the_stages_of_a_demo_keeps_the_finished_stages(setup, demo, tmp_path, sig):
    workdir = tmp_path / "demo"
    shutil.copytree(demo, workdir)
    before = _files(workdir)
    err = _signal_at(setup, workdir, _demo(setup, workdir), "stage", sig)
    assert f"{sig.name} during {signals.PHASES['stage']}: " in err
    _assert_kept(before, workdir)
    assert not (workdir / "teacher_mae").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_the_trainer_as_a_library_answers_sigterm_and_sighup_in_its_final_evaluation(
    setup, finished, tmp_path, sig
):
    """``train()`` from a script: its final evaluation used to run without handlers (status 143)."""
    tfds_dir, teachers, _, _ = setup
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = _files(workdir)
    err = _signal_at(
        setup,
        workdir,
        [sys.executable, "-c", LIBRARY_RUN, str(workdir), tfds_dir, *map(str, teachers)],
        "eval",
        sig,
    )
    assert f"{sig.name} during the final evaluation: " in err
    _assert_kept(before, workdir)


def test_a_signal_ignored_when_the_run_starts_stays_ignored():
    """``nohup`` ignores SIGHUP: a hang-up must not stop the run it started."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        assert signals.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not previous_term
    finally:
        signals.uninstall()
        signal.signal(signal.SIGHUP, previous)
    assert signal.getsignal(signal.SIGTERM) is previous_term


@pytest.mark.parametrize("sig,after_s", [(signal.SIGINT, 1.5), (signal.SIGHUP, 3.0), (signal.SIGTERM, 4.0)])
def test_signal_while_importing_exits_with_its_status(setup, tmp_path, sig, after_s):
    """No pause: the signal lands wherever start-up is (importing JAX/TensorFlow, loading the config)."""
    proc = _launch(setup, tmp_path, _tiny(setup, tmp_path))
    time.sleep(after_s)
    assert proc.poll() is None, _stderr(tmp_path)[-3000:]
    proc.send_signal(sig)
    status = proc.wait(timeout=EXIT_WITHIN_S)
    assert status == STATUS[sig], _stderr(tmp_path)[-3000:]
    assert "Traceback" not in _stderr(tmp_path)

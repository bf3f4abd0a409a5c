"""Faults: SIGKILL and resume, SIGTERM, truncated checkpoints, NaN steps, corrupt images, workdir faults,
bad command lines and files through the real CLI."""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import flax.serialization
import jax
import numpy as np
import pytest
from PIL import Image

from hybrid_distill_jax import workdir_lock
from hybrid_distill_jax.config_lib import base_config
from hybrid_distill_jax.data import pipeline
from hybrid_distill_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteError, Preempted
from hybrid_distill_jax.train import Trainer, metrics, train
from hybrid_distill_jax.train import checkpoint as checkpoint_lib
from tests.helpers import REPO, make_teacher, tiny_cli, tiny_cli_env, tiny_distill_config

LOSS_KEYS = ("loss", "feature_loss", "relation_loss", "grad_norm", "lr", "keep", "nonfinite_steps")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)


def _last_logged_step(workdir):
    rows = metrics.read_metrics(str(workdir))
    return rows[-1]["step"] if rows else 0


def _run_until(cmd, workdir, step, sig):
    """Starts training, sends ``sig`` once the run has logged ``step``; returns the exit code."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=tiny_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while proc.poll() is None and _last_logged_step(workdir) < step and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err.decode()


def _final_params(workdir):
    with open(os.path.join(workdir, "export", "params.msgpack"), "rb") as f:
        return jax.tree.leaves(flax.serialization.msgpack_restore(f.read()))


def _loss_rows(workdir):
    return [
        {k: r[k] for k in LOSS_KEYS if k in r} | {"step": r["step"]}
        for r in metrics.read_metrics(str(workdir))
    ]


def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path, tfds_dir, teachers):
    reference = tmp_path / "reference"
    done = subprocess.run(
        tiny_cli(reference, tfds_dir, teachers),
        cwd=REPO,
        env=tiny_cli_env(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    killed = tmp_path / "killed"
    kill_steps = sorted(np.random.default_rng(0).choice(np.arange(2, 11), size=3, replace=False))
    for step in kill_steps:
        code, err = _run_until(tiny_cli(killed, tfds_dir, teachers), killed, int(step), signal.SIGKILL)
        assert code == -signal.SIGKILL, err[-3000:]
    final = subprocess.run(
        tiny_cli(killed, tfds_dir, teachers), cwd=REPO, env=tiny_cli_env(), capture_output=True, timeout=300
    )
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    assert "resumed from" in final.stderr.decode()

    for a, b in zip(_final_params(reference), _final_params(killed)):
        np.testing.assert_array_equal(a, b)
    assert _loss_rows(reference) == _loss_rows(killed)


def test_sigterm_checkpoints_and_exits_with_documented_code(tmp_path, tfds_dir, teachers):
    workdir = tmp_path / "run"
    code, err = _run_until(tiny_cli(workdir, tfds_dir, teachers), workdir, 3, signal.SIGTERM)
    assert code == Preempted.exit_code == 75, err[-3000:]
    assert "Preempted: preempted: checkpoint written at step" in err
    steps = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), every=2).all_steps()
    stopped_at = int(err.split("checkpoint written at step ")[1].split()[0])
    assert stopped_at in steps and 3 <= stopped_at < 12
    done = subprocess.run(
        tiny_cli(workdir, tfds_dir, teachers), cwd=REPO, env=tiny_cli_env(), capture_output=True, timeout=300
    )
    assert done.returncode == 0 and f"resumed from {workdir}/checkpoints/{stopped_at}" in done.stderr.decode()


def test_truncated_latest_checkpoint_is_skipped(tmp_path, tfds_dir):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=6, batch=8)
    c.checkpoint_every = 2
    train(c, str(tmp_path / "run"))
    state_dir = tmp_path / "run" / "checkpoints" / "6" / "state"
    for entry in os.listdir(state_dir):  # a write cut short: the state's data is gone
        path = state_dir / entry
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    trainer = Trainer(c, str(tmp_path / "run"))
    _, start = trainer.initial_state()
    assert start == 4
    trainer.run()  # resumes from 4 and replaces the damaged checkpoint 6 rather than keeping it
    _, start = Trainer(c, str(tmp_path / "run")).initial_state()
    assert start == 6


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_injected_nan_is_skipped_or_stops_the_run(tmp_path, tfds_dir, policy):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=6, batch=8)
    c.nonfinite_policy = policy
    c.faults.nan_at_step = 3  # the 4th step
    c.checkpoint_every = 2
    c.log_every = 1
    if policy == "skip":
        result = train(c, str(tmp_path / "run"))
        rows = metrics.read_metrics(str(tmp_path / "run"))
        assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.params))
    else:
        with pytest.raises(NonFiniteError, match="step 4"):
            train(c, str(tmp_path / "run"))
        steps = checkpoint_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), every=2).all_steps()
        assert steps == [2]  # the last good checkpoint; nothing written after the bad step


def _folder_dataset(root, corrupt):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(12):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(
                    root / split / cls / f"{i}.png"
                )
    for name in corrupt:
        (root / "train" / "a" / name).write_bytes(b"\xff\xd8 not really a jpeg")


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_corrupt_images_are_skipped_and_counted_or_fail_fast(tmp_path, tfds_dir, policy):
    _folder_dataset(tmp_path / "images", ["bad1.jpg", "bad2.png"])
    c = base_config("supervised")
    c.data.update(
        dict(
            name="folder",
            data_dir=str(tmp_path / "images"),
            eval_split="test",
            on_corrupt=policy,
            shuffle_buffer=16,
        )
    )
    c.update(dict(image_size=16, batch_size=8, total_steps=8, log_every=1, tensorboard=False))
    c.model.variant = "pico/8"
    c.eval.at_end = False
    c.checkpoint_every = 0
    if policy == "skip":
        train(c, str(tmp_path / "run"))
        assert {os.path.basename(p) for p in pipeline.unreadable_files()} >= {"bad1.jpg", "bad2.png"}
        assert metrics.read_metrics(str(tmp_path / "run"))[-1]["unreadable_files"] >= 2
    else:
        with pytest.raises(DataError, match=r"unreadable image .*bad[12]\.(jpg|png)"):
            train(c, str(tmp_path / "run"))


def test_unwritable_workdir_fails_before_training(tmp_path, tfds_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    c = tiny_distill_config(tmp_path, tfds_dir)
    with pytest.raises(ConfigError, match="--workdir=.*not writable"):
        Trainer(c, str(blocker / "run"))


def test_failed_checkpoint_write_names_it_and_keeps_earlier_ones(tmp_path, tfds_dir, monkeypatch):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=6, batch=8)
    c.checkpoint_every = 2
    trainer = Trainer(c, str(tmp_path / "run"))
    real_save = trainer.checkpointer._manager.save

    def disk_full_at_4(step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(step, *args, **kwargs)

    monkeypatch.setattr(trainer.checkpointer._manager, "save", disk_full_at_4)
    with pytest.raises(CheckpointError, match="could not write checkpoint 4 .*No space left on device"):
        trainer.run()
    trainer.checkpointer.wait()
    resumed = Trainer(c, str(tmp_path / "run"))
    _, start = resumed.initial_state()
    assert start == 2


@pytest.mark.parametrize(
    "case", ["misspelled config", "config syntax error", "unknown override", "cut teacher"]
)
def test_cli_bad_inputs_print_one_line_and_exit_2(tmp_path, tfds_dir, teachers, case):
    """The reported cases through the real command line (test_bad_files.py has the whole table)."""
    command = tiny_cli(tmp_path / "run", tfds_dir, teachers)
    if case == "misspelled config":
        command[4], expected = "tests/tiny_confg.py", "error: --config=tests/tiny_confg.py: no such file"
    elif case == "config syntax error":
        (tmp_path / "bad.py").write_text("def get_config(:\n")
        command[4], expected = str(tmp_path / "bad.py"), "not a valid Python config file: line 1: "
    elif case == "unknown override":
        command.append("--config.no_such=1")
        expected = "error: --config.no_such: no such field in the config; fields there: "
    else:
        cut = tmp_path / "teacher"
        shutil.copytree(teachers[1], cut)
        data = (cut / "params.msgpack").read_bytes()
        (cut / "params.msgpack").write_bytes(data[: len(data) // 2])
        command[-1] = f"--config.teachers.mae.checkpoint={cut}"
        expected = f"error: teachers.mae.checkpoint: {cut}/params.msgpack is not a readable parameter file"
    proc = subprocess.run(command, cwd=REPO, env=tiny_cli_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in errors[0], errors[0]


# ------------------------------------------------------------------------ a full disk, a busy workdir


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """``tiny_cli_env`` with a compile cache outside the workdir (kept for the module's later runs)."""
    return dict(tiny_cli_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))


@contextlib.contextmanager
def _small_disk(directory, size: str):
    """A real file system of ``size`` (a tmpfs) at ``directory``, unmounted on the way out; the test is
    skipped where mounting is not permitted (it needs root, or CAP_SYS_ADMIN)."""
    os.makedirs(directory, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def _resize(directory, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True)


def _cli(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# What fills up: the directory of the workdir ("" = the workdir itself) on a file system too small for
# the run, the overrides, and the error line expected (WD: the workdir).
FULL_DISKS = {
    "checkpoint": (
        "checkpoints",
        "768k",  # one checkpoint of the tiny model (~500 KiB) fits (step 2), the second does not
        [],
        r"could not write checkpoint \d+ to WD/checkpoints: No space left on device \(.+ free on its "
        r"file system\); earlier checkpoints are intact",
    ),
    "export": ("export", "64k", [], r"WD/export/params\.msgpack: No space left on device \(.+ free on its"),
    "metrics": ("", "8k", [], r"WD/metrics\.jsonl: No space left on device \(\d+ "),
    "tensorboard": ("tensorboard", "4k", ["--config.tensorboard=true"], r"WD/tensorboard: No space left on "),
}


@pytest.mark.parametrize("what", list(FULL_DISKS))
def test_a_full_disk_is_one_line_and_resumes_once_space_is_freed(tmp_path, tfds_dir, teachers, cli_env, what):
    """A real small file system fills up during a checkpoint write, the export, metrics.jsonl or TensorBoard:
    one line naming the path and the free space, exit 2, no traceback from any thread (orbax's writers
    used to print ~90), no torn metrics line, the checkpoints written before intact; once space is freed
    the same command resumes from the last of them and finishes (run for the checkpoint write)."""
    where, size, overrides, expected = FULL_DISKS[what]
    workdir = tmp_path / "run"
    # 20 steps: 20 lines overflow the page of metrics.jsonl's 8k file system (its other page: the lock)
    command = tiny_cli(workdir, tfds_dir, teachers) + ["--config.total_steps=20", *overrides]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_small_disk(workdir / where, size))
        if what == "metrics":  # only metrics.jsonl fills the workdir: checkpoints go to a disk of their own
            stack.enter_context(_small_disk(workdir / "checkpoints", "8m"))
        full = _cli(command, cli_env)
        errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
        assert full.returncode == 2 and len(errors) == 1, full.stderr[-3000:]
        assert re.fullmatch("error: " + expected.replace("WD", re.escape(str(workdir))) + ".*", errors[0])
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        if os.path.exists(workdir / "metrics.jsonl"):
            text = (workdir / "metrics.jsonl").read_text()
            # no torn line (the run's config.json, written first, may leave no room for any)
            lines = text.splitlines()
            assert text == "" or (text.endswith("\n") and all(json.loads(line) for line in lines))
        if what == "checkpoint":
            kept = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), every=0).all_steps()
            _resize(workdir / where, "16m")
            again = _cli(command, cli_env)
            assert again.returncode == 0, again.stderr[-3000:]
            assert f"resumed from {workdir}/checkpoints/{max(kept)}" in again.stderr


def test_a_second_run_in_a_busy_workdir_refuses_and_a_killed_run_does_not_block(
    tmp_path, tfds_dir, teachers, cli_env
):
    """Two runs in one workdir both trained and checkpointed. The second now refuses in one line naming the
    first (host, pid), exit 2; the lock goes with the first when it is SIGKILLed, and the rerun trains."""
    workdir = tmp_path / "run"
    command = tiny_cli(workdir, tfds_dir, teachers)
    log = tmp_path / "first.txt"
    with open(log, "w") as stderr:
        first = subprocess.Popen(
            command + ["--config.faults.pause_at=train", "--config.faults.pause_s=600"],
            cwd=REPO,
            env=cli_env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 240
        while "fault injection: pausing at train" not in log.read_text():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        second = _cli(command, cli_env)
    finally:
        first.kill()
        first.wait()
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    holder = f"host {socket.gethostname()}, pid {first.pid}, since "
    assert errors[0].startswith(f"error: --workdir={workdir}: in use by another run ({holder}"), errors[0]
    assert not os.path.exists(workdir / "checkpoints" / "2")  # the second run wrote nothing

    rerun = _cli(command, cli_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_a_multi_host_run_holds_one_lock_in_process_0(tmp_path, monkeypatch):
    """Every process of a multi-host run checks the shared workdir; only process 0 locks it (the others
    would be refused by it), and a process re-enters its own lock (the phases of a chain)."""
    workdir = tmp_path / "shared"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    workdir_lock.check_workdir(str(workdir))
    assert not os.path.exists(workdir / workdir_lock.LOCK_FILE)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    workdir_lock.check_workdir(str(workdir))
    workdir_lock.check_workdir(str(workdir))
    lock = str(workdir / workdir_lock.LOCK_FILE)
    probe = "import fcntl, sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    taken = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, text=True)
    assert taken.returncode != 0 and "BlockingIOError" in taken.stderr
    assert f"pid {os.getpid()}," in open(lock).read()

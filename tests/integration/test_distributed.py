"""Multi-process start-up: argument resolution, bad settings, and two real processes on localhost.

The two-process test runs ``jax.distributed.initialize`` in subprocesses (4 CPU devices each, gloo
collectives) and checks that their FSDP step equals this single 8-device process's, that only process 0
writes metrics/exports, and that their orbax checkpoint restores here.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.parallel import distributed
from tests.integration.test_sharding import (
    REPO,
    assert_same,
    equivalence_config,
    fixed_batches,
    gathered_params,
    run_fixed_steps,
    subprocess_env,
)

SLURM = dict(
    SLURM_JOB_ID="77",
    SLURM_STEP_NODELIST="node[001-002]",
    SLURM_NTASKS="16",
    SLURM_PROCID="3",
    SLURM_LOCALID="3",
)


# ---- resolution --------------------------------------------------------------------------------------
def test_single_process_needs_nothing():
    assert distributed.resolve(env={}) is None
    assert distributed.resolve(num_processes=1, env={}) is None
    assert distributed.resolve(coordinator_address="h:1", num_processes=2, process_id=0, mode="off") is None


def test_flags_then_environment():
    kw = distributed.resolve("10.0.0.2:8476", 2, 1, "0,1", env={})
    assert kw == dict(
        coordinator_address="10.0.0.2:8476", num_processes=2, process_id=1, local_device_ids=[0, 1]
    )
    env = dict(JAX_COORDINATOR_ADDRESS="h:9", HD_NUM_PROCESSES="4", JAX_PROCESS_ID="2")
    assert distributed.resolve(env=env) == dict(coordinator_address="h:9", num_processes=4, process_id=2)
    assert distributed.resolve(process_id=3, env=env)["process_id"] == 3  # a flag beats the environment


def test_clusters_are_left_to_jax():
    assert distributed.detect_cluster(SLURM) == "slurm"
    assert distributed.resolve(env=SLURM) == {}  # JAX's SLURM detection fills in everything
    assert distributed.detect_cluster(dict(SLURM, SLURM_NTASKS="1")) is None
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "tpu"
    assert distributed.resolve(mode="on", env={}) == {}  # Cloud TPU VM pods: JAX asks the metadata server


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_processes=2, process_id=0), "--num_processes=2 needs --coordinator_address=HOST:PORT"),
        (dict(coordinator_address="h:1", num_processes=2), "also needs --num_processes and --process_id"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2 is outside 0..1"),
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
        (dict(num_processes=0), "--num_processes=0: expected >= 1"),
        (dict(mode="maybe"), "--distributed='maybe'"),
    ],
)
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        distributed.resolve(**kwargs, env={})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_main_reports_a_missing_coordinator(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD", "OMPI_", "TPU_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_distill_jax.main", "--config", "tests/tiny_config.py"]
        + ["--workdir", str(tmp_path), "--num_processes=2", "--process_id=0"],
        env=dict(env, PYTHONPATH=REPO),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --num_processes=2 needs --coordinator_address=HOST:PORT" in proc.stderr


# ---- two processes on localhost ----------------------------------------------------------------------
WORKER = r"""
import json, os, sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_threefry_partitionable", True)
from hybrid_distill_jax.parallel import distributed
tmp, tfds_dir, port, pid, out = sys.argv[1:6]
assert distributed.initialize(f"127.0.0.1:{port}", 2, int(pid), initialization_timeout=120)
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
import time; t0 = time.time(); log = lambda m: print(f"[{pid}] {time.time() - t0:.1f}s {m}", file=sys.stderr)
from hybrid_distill_jax.train import Trainer
from tests.integration.test_sharding import equivalence_config, fixed_batches, gathered_params
from tests.integration.test_sharding import run_fixed_steps
cfg = equivalence_config(tmp, tfds_dir, dict(data=2, fsdp=4), "fsdp")
trainer = Trainer(cfg, os.path.join(tmp, "loop"))
losses, state = run_fixed_steps(trainer, fixed_batches())
params = gathered_params(state)
log("fixed steps")
if jax.process_index() == 0:
    import numpy as np
    np.savez(out + ".npz", **params)
    with open(out + ".json", "w") as f:
        json.dump({"losses": losses}, f)
# The whole loop (same compiled step): per-process input, process-0-only logs and export, and a
# multi-host orbax checkpoint.
trainer.total_steps = 2
result = trainer.run()
log("loop")
print("done", jax.process_index(), result.step)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tfds_dir):
    from hybrid_distill_jax.train import Trainer, metrics

    cfg = equivalence_config(tmp_path, tfds_dir, dict(data=2, fsdp=4), "fsdp")  # also writes the teachers
    env = subprocess_env(4)
    port, out = _free_port(), str(tmp_path / "two")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), tfds_dir, str(port), str(i), out],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
        assert "done" in stdout

    # Same losses and parameters as this single process with the same 8-device layout.
    trainer = Trainer(cfg, str(tmp_path / "single"))
    losses, state = run_fixed_steps(trainer, fixed_batches())
    with open(out + ".json") as f:
        np.testing.assert_allclose(json.load(f)["losses"], losses, rtol=1e-5)
    assert_same(dict(np.load(out + ".npz")), gathered_params(state))

    # Process 0 alone wrote the metrics (one line per step) and the export; the checkpoint restores here.
    loop = str(tmp_path / "loop")
    assert [m["step"] for m in metrics.read_metrics(loop)] == [2]  # log_every=2, written once
    assert os.path.exists(os.path.join(loop, "export", "model.json"))
    restored, start = Trainer(cfg, loop).initial_state()
    assert start == 2 and int(restored["step"]) == 2

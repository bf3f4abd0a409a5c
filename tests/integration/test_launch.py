"""The launch scripts, executed.

* ``launch/slurm_multinode.sbatch`` on a one-node SLURM cluster on localhost (``scripts/local_slurm.sh``):
  2 tasks, 2 CPU devices each, gloo collectives, JAX's own SLURM detection; cancelled mid-run and
  resubmitted; its final parameters equal one process's over the same examples.
* ``launch/tpu_pod.sh`` against a ``gcloud`` stub that records every call and runs each ``ssh
  --worker=all`` command on two fake workers (their python records what it was asked to run).
* ``launch/gpu_single_node.sh`` on 4 fake CPU devices: same parameters as the same config run here.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from hybrid_distill_jax import config_lib
from hybrid_distill_jax.data import pipeline
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.train import Trainer, metrics
from hybrid_distill_jax.train import trainer as trainer_module
from tests import tiny_config
from tests.helpers import make_teacher
from tests.integration.test_sharding import REPO, assert_same, flat, gathered_params, subprocess_env

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo")


def teachers(tmp_path) -> dict:
    paths = {name: str(tmp_path / f"t_{name}") for name in ("deit", "mae")}
    for seed, path in enumerate(paths.values(), start=1):
        if not os.path.exists(path):
            make_teacher(path, seed=seed)
    return paths


def tiny_fields(tmp_path, tfds_dir, **extra) -> dict:
    """Overrides of tests/tiny_config.py shared by a launched run and its in-process reference.

    Top-k masking and no drop-path: no random stream that could differ between device layouts."""
    t = teachers(tmp_path)
    fields = {
        "data.data_dir": tfds_dir,
        "teachers.deit.checkpoint": t["deit"],
        "teachers.mae.checkpoint": t["mae"],
        "masking.selection": "topk",
        "student.drop_path": 0.0,
    }
    fields.update(extra)
    return fields


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cli(fields: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in fields.items()]


def config_of(fields: dict):
    c = tiny_config.get_config()
    c.update_from_flattened_dict(fields)
    return c


def launch_env(devices: int, **extra) -> dict:
    """A launch script's environment: this interpreter, N CPU devices, no SLURM_* inherited from a job."""
    env = {k: v for k, v in subprocess_env(devices).items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", **extra)
    return env


# ---- SLURM -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster (localhost, 2 CPUs); yields the client environment. Stopped at the end."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # where the daemons live
    missing = [t for t in SLURM_TOOLS if shutil.which(t, path=path) is None]
    if missing:
        pytest.skip(
            f"SLURM test needs slurm-wlm and munge ({', '.join(missing)} not found); as root on "
            "Debian/Ubuntu: scripts/local_slurm.sh install"
        )
    state = str(tmp_path_factory.mktemp("slurm"))
    script = os.path.join(REPO, "scripts", "local_slurm.sh")
    started = subprocess.run(["bash", script, "start", state], capture_output=True, text=True, timeout=180)
    try:
        if started.returncode != 0:
            logs = {
                name: open(os.path.join(state, name)).read()[-2000:]
                for name in ("slurmctld.log", "slurmd.log")
                if os.path.exists(os.path.join(state, name))
            }
            pytest.fail(f"local SLURM cluster did not start: {started.stderr}\n{logs}")
        yield dict(SLURM_CONF=os.path.join(state, "slurm.conf"))
    finally:
        subprocess.run(["bash", script, "stop", state], timeout=120)


def _sbatch(slurm, env, tmp_path, fields, wait: bool) -> subprocess.CompletedProcess:
    """Submits launch/slurm_multinode.sbatch as is; the options a user would set for a 1-node, 2-task run."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    cmd += ["--gpus-per-node=0", f"--output={tmp_path}/slurm-%j.out"] + (["--wait"] if wait else [])
    cmd += ["launch/slurm_multinode.sbatch", "tests/tiny_config.py", str(tmp_path / "run"), *cli(fields)]
    return subprocess.run(cmd, env={**env, **slurm}, cwd=REPO, capture_output=True, text=True, timeout=900)


def _job_output(tmp_path, job: str) -> str:
    path = tmp_path / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def _job_state(slurm, env, job: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env={**env, **slurm}, capture_output=True, text=True
    ).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "GONE"


def _checkpoints(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _two_process_stream(data_cfg, **kwargs):
    """What the two SLURM tasks read (process 0's rows, then process 1's), fed to one process."""
    streams = [
        pipeline.train_iterator(data_cfg, **kwargs, process_index=i, process_count=2) for i in range(2)
    ]
    for parts in zip(*streams):
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _example_log(path) -> dict[int, list[int]]:
    """Step -> example indices, from the lines of an examples.process{i}.jsonl (one line per step)."""
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1)), path
    return {line["step"]: line["index"] for line in lines}


def test_slurm_multinode_sbatch(slurm, tmp_path, tfds_dir, monkeypatch):
    steps = 24
    fields = tiny_fields(
        tmp_path,
        tfds_dir,
        **{
            "total_steps": steps,
            "checkpoint_every": 2,
            "mesh.data": 2,
            "mesh.fsdp": 2,
            "sharding.student": "fsdp",
            "sharding.fsdp_min_size": 0,
            "data.log_example_ids": True,
        },
    )
    env = launch_env(2)
    workdir = tmp_path / "run"

    # First submission: cancelled once it has checkpointed, before it is done.
    first = _sbatch(slurm, env, tmp_path, fields, wait=False)
    assert first.returncode == 0, first.stderr
    job = first.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 600
    while not any(s >= 4 for s in _checkpoints(workdir)):
        assert _job_state(slurm, env, job) in ("PENDING", "RUNNING"), _job_output(tmp_path, job)[-4000:]
        assert time.monotonic() < deadline, (
            "no checkpoint after 600 s:\n" + _job_output(tmp_path, job)[-4000:]
        )
        time.sleep(0.2)
    subprocess.run(["scancel", job], env={**env, **slurm}, check=True)
    while _job_state(slurm, env, job) in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, "cancelled job still running:\n" + _job_output(tmp_path, job)
        time.sleep(0.5)
    # SLURM's SIGTERM reached both processes: they agreed on a step, checkpointed there and exited 75.
    cancelled = _job_output(tmp_path, job)
    preempted = re.search(r"checkpoint written at step (\d+)", cancelled)
    assert preempted and "srun exited with 75" in cancelled, cancelled[-4000:]
    assert max(_checkpoints(workdir)) == int(preempted.group(1)) < steps

    # Resubmitted: it resumes from that checkpoint and finishes.
    second = _sbatch(slurm, env, tmp_path, fields, wait=True)
    job2 = second.stdout.strip().split(";")[0]
    out = _job_output(tmp_path, job2)
    assert second.returncode == 0, out[-4000:]
    assert "nodes: localhost, tasks: 2" in out and "srun exited with 0" in out
    assert "distributed: process 1 of 2, 2 local / 4 global devices" in out, out[-4000:]
    assert f"starting at {preempted.group(1)}" in out, out[-4000:]
    assert [m["step"] for m in metrics.read_metrics(str(workdir))] == list(range(1, steps + 1))

    # The same config in this process, on 4 of its devices, reading both processes' shards.
    monkeypatch.setattr(trainer_module, "train_iterator", _two_process_stream)
    reference = config_of({**fields, "mesh.num_devices": 4, "checkpoint_every": 0})
    expected = Trainer(reference, str(tmp_path / "reference")).run()
    restored, at = Trainer(reference, str(workdir)).initial_state()
    assert at == steps
    assert_same(gathered_params(restored), flat(expected.params))

    # Each task read its own shard (jax.process_index() in the pipeline): the examples it logged are the
    # reference's rows of that process, every step, across the cancel and the resume.
    seen = [_example_log(workdir / f"examples.process{i}.jsonl") for i in range(2)]
    both = _example_log(tmp_path / "reference" / "examples.process0.jsonl")
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(both) == list(range(1, steps + 1))
    for step, ids in both.items():
        assert seen[0][step] + seen[1][step] == ids, step
        assert not set(seen[0][step]) & set(seen[1][step]), step


def test_log_example_ids_is_validated(tmp_path, tfds_dir):
    c = config_of(tiny_fields(tmp_path, tfds_dir))
    c.data = ml_collections.ConfigDict({**c.data.to_dict(), "log_example_ids": "yes"})  # a config file's dict
    with pytest.raises(ConfigError, match=r"^data.log_example_ids='yes': expected True or False$"):
        config_lib.validate(c)


# ---- TPU pod -----------------------------------------------------------------------------------------
GCLOUD = r"""#!{python}
# Records each call; runs `ssh --worker=all|N --command CMD` on the fake workers (FAKE_WORKERS).
import json, os, subprocess, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and os.environ.get("FAKE_WORKERS"):
    command = args[args.index("--command") + 1]
    worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
    homes = sorted(os.environ["FAKE_WORKERS"].split(","))
    login = lambda home: dict(HOME=home, PATH=os.environ["PATH"])  # a fresh ssh session's environment
    rcs = [
        subprocess.run(["bash", "-c", command], cwd=home, env=login(home)).returncode
        for i, home in enumerate(homes)
        if worker == "all" or int(worker) == i
    ]
    sys.exit(max(rcs))
"""

FAKE_PYTHON = r"""#!{python}
# A worker's .venv/bin/python: records its arguments and environment, exits as told by exit_codes.
import json, os, signal, sys, time
with open("calls.jsonl", "a") as f:
    env = {{k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL", "HOME")}}
    f.write(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), env=env)) + "\n")
codes = open("exit_codes").read().split()
open("exit_codes", "w").write(" ".join(codes[1:]))
if codes[0] == "wait":  # like training: SIGTERM -> checkpoint -> exit 75
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(1)
sys.exit(int(codes[0]))
"""

TPU_ENV = dict(TPU_NAME="pod", ZONE="zone-b", ACCELERATOR_TYPE="v4-16", PROJECT="proj", REMOTE_DIR="hd")
RUN_ARGS = ["configs/hd.py:teachers/a,teachers/b", "/mnt/shared/run 1", "--config.name=it's a test"]


@pytest.fixture
def pod(tmp_path):
    """A gcloud stub on PATH and two fake workers, each with launch/ and a recording .venv/bin/python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    homes = []
    for i in range(2):
        remote = tmp_path / f"worker{i}" / "hd"
        shutil.copytree(os.path.join(REPO, "launch"), remote / "launch")
        (remote / ".venv" / "bin").mkdir(parents=True)
        (remote / ".venv" / "bin" / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
        (remote / ".venv" / "bin" / "python").chmod(0o755)
        homes.append(str(tmp_path / f"worker{i}"))
    log = tmp_path / "gcloud.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "SHARED_FSTYPES", "DRY_RUN", "SPOT")}
    env.update(TPU_ENV, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log))

    def run(*args, workers=False, **extra):
        e = dict(env, **extra)
        if workers:
            e["FAKE_WORKERS"] = ",".join(homes)
        log.write_text("")
        proc = subprocess.run(
            ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), *args], env=e, capture_output=True, text=True
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return proc, calls

    run.homes = homes
    return run


def _wait_for_exit(home, timeout=60) -> str:
    log = os.path.join(home, "hd", "train.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(log).read() if os.path.exists(log) else ""
        if "training exited with" in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{home}: training did not exit: {text}")


def _calls(home) -> list[dict]:
    with open(os.path.join(home, "hd", "calls.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tpu_pod_commands(pod, tmp_path):
    zone = ["--zone", "zone-b", "--project", "proj"]
    tpu = ["compute", "tpus", "tpu-vm"]
    proc, calls = pod("create", SPOT="1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        tpu
        + ["create", "pod", "--accelerator-type", "v4-16", "--version", "tpu-ubuntu2204-base", "--spot"]
        + zone
    ]

    proc, calls = pod("setup", TMPDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (archive,) = [c[4] for c in calls if c[3] == "scp"]
    assert calls[0] == tpu + ["scp", archive, "pod:/tmp/hybrid_distill.tar.gz", "--worker=all"] + zone
    assert calls[1][:6] == tpu + ["ssh", "pod", "--worker=all"] and calls[1][-4:] == zone
    install = calls[1][calls[1].index("--command") + 1]
    assert (
        "tar -C hd -xzf /tmp/hybrid_distill.tar.gz" in install
        and "pip install --quiet -e '.[tpu]'" in install
    )
    assert not os.path.exists(archive)  # the local archive is removed after the copy

    for name, extra, expected in [
        (
            "logs",
            ["1"],
            tpu + ["ssh", "pod", "--worker=1", "--command", "tail -n 100 -f hd/train.log"] + zone,
        ),
        ("delete", [], tpu + ["delete", "pod", "--quiet"] + zone),
    ]:
        proc, calls = pod(name, *extra)
        assert proc.returncode == 0 and calls == [expected], (proc.stderr, calls)

    # --dry-run prints exactly the gcloud command that `run` makes, and calls nothing.
    printed, none = pod("--dry-run", "run", *RUN_ARGS)
    assert printed.returncode == 0 and none == [], printed.stderr
    proc, (call,) = pod("run", *RUN_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(printed.stdout) == ["gcloud"] + call
    assert call[:6] == tpu + ["ssh", "pod", "--worker=all"] and call[-4:] == zone
    remote = shlex.split(call[call.index("--command") + 1])
    at = remote.index("train")
    assert remote[:3] == ["cd", "hd", "&&"] and "check" in remote
    assert remote[at - 3 : at + 4] == ["{", "nohup", "launch/tpu_worker.sh", "train", *RUN_ARGS]
    for name in ("create", "setup", "stop", "delete"):
        proc, calls = pod("--dry-run", name)
        assert proc.returncode == 0 and proc.stdout.startswith(("gcloud ", "tar ")) and calls == [], name


def test_tpu_pod_run_restarts_after_preemption_and_stops(pod):
    fstype = subprocess.run(["stat", "-f", "-c", "%T", pod.homes[0]], capture_output=True, text=True).stdout
    shared = f"nfs {fstype.strip()}"  # the fake workers' filesystem stands in for the shared mount

    # Shared-storage check: a filesystem type that is not listed is refused on every worker, nothing runs.
    proc, _ = pod("run", *RUN_ARGS, workers=True)
    assert proc.returncode == 2
    assert f"WORKDIR {RUN_ARGS[1]} is on a '{fstype.strip()}' filesystem, not shared storage" in proc.stderr
    assert not any(os.path.exists(os.path.join(h, "hd", "calls.jsonl")) for h in pod.homes)

    # Preempted (exit 75) -> the same command again on every worker; then a clean exit ends the loop.
    workdir = os.path.join(pod.homes[0], "shared run")  # stands in for the mount every worker sees
    for home in pod.homes:
        open(os.path.join(home, "hd", "exit_codes"), "w").write("75 0")
    proc, _ = pod("run", RUN_ARGS[0], workdir, RUN_ARGS[2], workers=True, SHARED_FSTYPES=shared)
    assert proc.returncode == 0, proc.stderr
    expected_argv = ["-m", "hybrid_distill_jax.main", "--distributed=on", "--config", RUN_ARGS[0]]
    expected_argv += ["--workdir", workdir, RUN_ARGS[2]]
    for home in pod.homes:
        log = _wait_for_exit(home)
        assert "exit 75 (preempted, checkpointed): restart 1" in log and "training exited with 0" in log
        calls = _calls(home)
        assert [c["argv"] for c in calls] == [expected_argv] * 2
        assert calls[0]["cwd"] == os.path.join(home, "hd")
        assert calls[0]["env"] == dict(
            JAX_COMPILATION_CACHE_DIR=os.path.join(home, ".cache", "hybrid_distill_jax", "jax"),
            TF_CPP_MIN_LOG_LEVEL="2",
            HOME=home,
        )
        assert not os.path.exists(os.path.join(home, "hd", "train.pid"))

    # `stop`: SIGTERM -> exit 75 (checkpointed), and no restart this time.
    for home in pod.homes:
        os.remove(os.path.join(home, "hd", "calls.jsonl"))
        os.remove(os.path.join(home, "hd", "train.log"))
        open(os.path.join(home, "hd", "exit_codes"), "w").write("wait 0")
    proc, _ = pod("run", RUN_ARGS[0], workdir, RUN_ARGS[2], workers=True, SHARED_FSTYPES=shared)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while not all(os.path.exists(os.path.join(h, "hd", "calls.jsonl")) for h in pod.homes):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc, (call,) = pod("stop", workers=True)
    assert proc.returncode == 0, proc.stderr
    assert call[call.index("--command") + 1] == "cd hd && launch/tpu_worker.sh stop"
    for home in pod.homes:
        assert "training exited with 75" in _wait_for_exit(home)
        assert len(_calls(home)) == 1


# ---- single-node GPU ---------------------------------------------------------------------------------
def test_gpu_single_node_on_fake_devices(tmp_path, tfds_dir):
    fields = tiny_fields(tmp_path, tfds_dir, total_steps=4, checkpoint_every=0)
    workdir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "launch/gpu_single_node.sh", "tests/tiny_config.py", str(workdir), *cli(fields)],
        env=launch_env(4),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (workdir / "train.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert "batch 8 on 4 device(s)" in log and "distributed: process" not in log, log[-4000:]
    assert [m["step"] for m in metrics.read_metrics(str(workdir))] == [1, 2, 3, 4]

    # The same config here, on 4 of this process's devices.
    reference = config_of({**fields, "mesh.num_devices": 4})
    expected = Trainer(reference, str(tmp_path / "reference")).run()
    restored, at = Trainer(reference, str(workdir)).initial_state()
    assert at == 4
    assert_same(gathered_params(restored), flat(expected.params))


# ---- pre-flight compiles (--compile-only): here, before any accelerator is asked for --------------------
def _described_teachers(tmp_path) -> list[str]:
    from tests.integration.test_compile import describe_teacher

    return [
        f"--config.teachers.deit.checkpoint={describe_teacher(tmp_path / 'tf', variant='nano/8')}",
        f"--config.teachers.mae.checkpoint={describe_teacher(tmp_path / 'tr')}",
        "--stages=first",
    ]


@pytest.mark.skipif(not _has("libtpu"), reason="TPU targets need libtpu: make install-aot")
def test_tpu_pod_compile_only_compiles_here_and_calls_no_gcloud(pod, tmp_path):
    workdir = tmp_path / "never"
    args = ["--compile-only", "run", "tests/tiny_config.py", str(workdir), *_described_teachers(tmp_path)]
    proc, calls = pod(
        *args, ACCELERATOR_TYPE="v5litepod-8", PYTHON=sys.executable, PYTHONPATH=REPO, XLA_FLAGS=""
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert calls == [] and not workdir.exists()
    assert "tiny on v5e:2x4: 8 x TPU v5 lite" in proc.stdout and "| keep=12 |" in proc.stdout


@pytest.mark.skipif(
    not _has("jax_cuda12_plugin"), reason="GPU targets need the CUDA plugin: make install-aot"
)
@pytest.mark.parametrize(
    "script, env, expected",
    [
        ("gpu_single_node.sh", dict(GPU_TARGET="h200", NUM_GPUS="2"), "tiny on 2x h200: 2 x NVIDIA H200"),
        ("slurm_multinode.sbatch", dict(GPU_TARGET="h200", NODES="2", GPUS_PER_NODE="2"), "2 host(s)"),
    ],
)
def test_gpu_launchers_compile_only(tmp_path, script, env, expected):
    workdir = tmp_path / "never"
    cmd = ["bash", os.path.join("launch", script), "--compile-only", "tests/tiny_config.py", str(workdir)]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run_env.update(env, PYTHON=sys.executable, PYTHONPATH=REPO, XLA_FLAGS="", HD_REPO=REPO)
    proc = subprocess.run(
        [*cmd, *_described_teachers(tmp_path)],
        env=run_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout and "fits" in proc.stdout and not workdir.exists()
    # the launchers' own GPU settings reach the compile: 90% of each GPU is JAX's
    assert "usable at XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in proc.stdout

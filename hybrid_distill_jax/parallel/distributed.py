"""Multi-host start-up: ``jax.distributed.initialize`` from flags, environment or the cluster.

Call :func:`initialize` before anything touches a device (``main`` does). Sources, first found wins:

1. arguments / flags ``--coordinator_address``, ``--num_processes``, ``--process_id``,
   ``--local_device_ids``;
2. environment ``HD_COORDINATOR_ADDRESS``/``JAX_COORDINATOR_ADDRESS``, ``HD_NUM_PROCESSES``/
   ``JAX_NUM_PROCESSES``, ``HD_PROCESS_ID``/``JAX_PROCESS_ID``, ``JAX_LOCAL_DEVICE_IDS``;
3. JAX's own cluster detection for what is still unset: SLURM (``srun``, one process per GPU), Open
   MPI, Kubernetes TPU jobs and Cloud TPU VM pods (through the TPU metadata server).

``mode``: ``auto`` (default) initializes when 1 or 2 gives something or a multi-process cluster is
visible in the environment (SLURM with ``SLURM_NTASKS > 1``, Open MPI, GKE TPU hosts); Cloud TPU VM pods
are not visible from the environment alone, so the TPU launch scripts pass ``--distributed=on``.
``on`` always initializes (letting JAX detect the rest); ``off`` never does (one process).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hybrid_distill_jax.errors import ConfigError

log = logging.getLogger("hybrid_distill_jax")

MODES = ("auto", "on", "off")
_ENV = {
    "coordinator_address": ("HD_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("HD_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("HD_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("JAX_LOCAL_DEVICE_IDS",),
}


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """The multi-process cluster JAX can configure itself from, as seen in the environment, or None."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
        return "slurm"
    if (
        "OMPI_MCA_orte_hnp_uri" in env
        and _int(env.get("OMPI_COMM_WORLD_SIZE", "2"), "OMPI_COMM_WORLD_SIZE") > 1
    ):
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    return None


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected an integer") from None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    mode: str = "auto",
    env: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Keyword arguments for ``jax.distributed.initialize``, or None for a single-process run.

    Raises ConfigError (one line) for settings that cannot work, e.g. several processes and no
    coordinator outside a cluster JAX can detect.
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise ConfigError(f"--distributed={mode!r}: expected one of {list(MODES)}")
    if mode == "off":
        return None
    given = {
        "coordinator_address": coordinator_address or None,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids or None,
    }
    for key, names in _ENV.items():
        for name in names:
            if given[key] is None and env.get(name):
                given[key] = env[name]
    if given["num_processes"] is not None:
        given["num_processes"] = _int(given["num_processes"], "--num_processes")
        if given["num_processes"] < 1:
            raise ConfigError(f"--num_processes={given['num_processes']}: expected >= 1")
    if given["process_id"] is not None:
        given["process_id"] = _int(given["process_id"], "--process_id")
    ids = given["local_device_ids"]
    if isinstance(ids, str):
        ids = [_int(i, "--local_device_ids") for i in ids.split(",") if i.strip()]
    given["local_device_ids"] = list(ids) if ids else None
    address = given["coordinator_address"]
    if address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", address):
        raise ConfigError(f"--coordinator_address={address!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")

    cluster = detect_cluster(env)
    n, pid = given["num_processes"], given["process_id"]
    if n == 1 and mode == "auto":
        return None
    explicit = any(v is not None for v in given.values())
    if mode == "auto" and not explicit and cluster is None:
        return None
    if cluster is None:
        if n is not None and n > 1 and address is None:
            raise ConfigError(
                f"--num_processes={n} needs --coordinator_address=HOST:PORT (process 0's host and a free "
                "port; or JAX_COORDINATOR_ADDRESS) outside a SLURM, Open MPI or TPU-pod cluster"
            )
        if address is not None and (n is None or pid is None):
            raise ConfigError(
                f"--coordinator_address={address} also needs --num_processes and --process_id outside a "
                "SLURM, Open MPI or TPU-pod cluster"
            )
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ConfigError(f"--process_id={pid} is outside 0..{n - 1} (--num_processes={n})")
    return {k: v for k, v in given.items() if v is not None}


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    mode: str = "auto",
    initialization_timeout: int = 300,
) -> bool:
    """Joins the multi-process job described by the arguments/environment; False for a single process."""
    kwargs = resolve(coordinator_address, num_processes, process_id, local_device_ids, mode)
    if kwargs is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(**kwargs, initialization_timeout=initialization_timeout)
    log.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True

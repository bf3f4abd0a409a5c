"""Hardware this host does not have, as compile-only devices: TPU slices (libtpu) and NVIDIA GPUs (the
CUDA PJRT plugin with a device description), for ``jax.jit(...).lower(...).compile()`` without a device.

``--target`` names one of:

* a TPU slice, ``GENERATION:TOPOLOGY`` as Cloud TPU writes it: ``v4:2x2x2``, ``v5e:16x16``,
  ``v5p:4x4x4``, ``v6e:8x8``, ``tpu7x:2x2x1`` (with ``num_slices`` for multi-slice), or an accelerator
  type as ``gcloud`` takes it (``v4-32``, ``v5p-64``, ``v5litepod-16``, ``v6e-16``: the slice's default
  topology). v4 compiles with one device per chip (megacore), as the TPU runtime presents it.
* a GPU card by name (``h100-sxm``, ``h200``: the files in ``gpu_specs/``) or the path of a
  ``GpuTargetConfigProto`` text file, with ``gpus_per_host`` GPUs on each of ``hosts`` hosts.

``describe(...)`` returns a :class:`Target`: the compile-only devices, how many processes (hosts) own
them, and the memory a program may use on each: a TPU's HBM; a GPU's memory times
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX's default 0.75; ``launch/env.sh`` sets 0.90), the pool JAX's
allocator takes up front. :func:`prepare_environment` must run before JAX is imported: JAX then
uses the CPU as its runtime and never looks for a real accelerator.
"""

from __future__ import annotations

import dataclasses
import os
import re

from hybrid_distill_jax.errors import ConfigError

GPU_SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
GPU_CARDS = {"h100-sxm": "h100_sxm.txtpb", "h200": "h200.txtpb"}

# High-bandwidth memory of one JAX device, in GiB (Cloud TPU system architecture pages). tpu7x has two
# devices per chip, each with half of the chip's 192 GiB.
TPU_GENERATIONS = {
    "v4": dict(rank=3, hbm_gib=32.0, chip_config="megacore"),
    "v5e": dict(rank=2, hbm_gib=16.0, chip_config="default"),
    "v5p": dict(rank=3, hbm_gib=95.0, chip_config="default"),
    "v6e": dict(rank=2, hbm_gib=32.0, chip_config="default"),
    "tpu7x": dict(rank=3, hbm_gib=96.0, chip_config="default"),
}
_TPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e|tpu7x):(\d+(?:x\d+){1,2})$")
# gcloud accelerator types: generation, whether the count is of TensorCores (2 per chip) or chips
_ACCELERATOR_TYPE = re.compile(r"^(v4|v5p|v5litepod|v6e)-(\d+)$")
_ACCELERATOR_GENERATION = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5litepod": ("v5e", 1), "v6e": ("v6e", 1)}
# The default slice shape per chip count (Cloud TPU's topology tables).
_DEFAULT_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_DEFAULT_3D.update({512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"})
_DEFAULT_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
    """Compile-only devices of one slice or cluster, in the order a mesh takes them."""

    name: str  # e.g. 'v5e:16x16' or '8x h200'
    platform: str  # 'tpu' | 'cuda'
    devices: tuple
    device_kind: str
    memory_bytes: int  # what one device's program may use
    num_processes: int
    device_memory_bytes: int = 0  # the device's whole memory, where that differs

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def prepare_environment(platform: str, *, triton_gemm: bool = False) -> None:
    """JAX's runtime on the CPU, the accelerator's compiler through its plugin; set before JAX loads.

    libtpu is told not to ask a metadata server which TPU this is (there is none), and the CUDA plugin
    not to check a driver (there is none either). ``triton_gemm=False`` makes XLA emit every GPU GEMM
    as a cuBLAS(Lt) call: Triton GEMM tiles are chosen by autotuning, which needs a device.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    if platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another compile or a test run
    else:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        if not triton_gemm:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()


def tpu_topology_name(accelerator_type: str) -> str | None:
    """'v4-32' -> 'v4:2x2x4' (16 chips), 'v5litepod-16' -> 'v5e:4x4'; None for another kind of name."""
    match = _ACCELERATOR_TYPE.match(accelerator_type)
    if match is None:
        return None
    generation, per_chip = _ACCELERATOR_GENERATION[match.group(1)]
    chips, rest = divmod(int(match.group(2)), per_chip)
    shapes = _DEFAULT_3D if TPU_GENERATIONS[generation]["rank"] == 3 else _DEFAULT_2D
    if rest or chips not in shapes:
        raise ConfigError(
            f"--target={accelerator_type}: no default topology for {int(match.group(2))} "
            f"{'TensorCores' if per_chip == 2 else 'chips'}; name it, e.g. {generation}:{shapes[max(shapes)]}"
        )
    return f"{generation}:{shapes[chips]}"


def platform_of(name: str) -> str:
    """'tpu' or 'cuda' for a ``--target`` value (ConfigError naming it when it is neither)."""
    if _TPU_NAME.match(name) or _ACCELERATOR_TYPE.match(name):
        return "tpu"
    if name in GPU_CARDS or name.endswith(".txtpb"):
        return "cuda"
    raise ConfigError(
        f"--target={name!r}: expected a TPU slice GENERATION:TOPOLOGY (generations "
        f"{sorted(TPU_GENERATIONS)}, e.g. v5e:16x16, v5p:2x2x1), a GPU card "
        f"({', '.join(sorted(GPU_CARDS))}) or a .txtpb GPU description"
    )


def describe(name: str, *, num_slices: int = 1, gpus_per_host: int = 8, hosts: int = 1) -> Target:
    """The compile-only devices of ``name`` (see the module docstring); JAX must already be set up by
    :func:`prepare_environment`."""
    platform = platform_of(name)
    for field, value in (("num_slices", num_slices), ("gpus_per_host", gpus_per_host), ("hosts", hosts)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{field}={value!r}: expected a positive integer")
    if platform == "tpu":
        return _tpu(tpu_topology_name(name) or name, num_slices)
    return _gpu(name, gpus_per_host, hosts)


def _tpu(name: str, num_slices: int) -> Target:
    from jax.experimental import topologies

    generation, shape = _TPU_NAME.match(name).groups()
    spec = TPU_GENERATIONS[generation]
    if len(shape.split("x")) != spec["rank"]:
        raise ConfigError(f"--target={name!r}: a {generation} topology has {spec['rank']} dimensions")
    try:
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name=spec["chip_config"],
            num_slices=num_slices,
        )
    except ImportError as e:
        raise ConfigError(f"--target={name}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- libtpu's errors: not installed, unknown topology
        raise ConfigError(_libtpu_message(name, e)) from None
    devices = tuple(topology.devices)
    label = name + (f" x{num_slices} slices" if num_slices > 1 else "")
    return Target(
        name=label,
        platform="tpu",
        devices=devices,
        device_kind=devices[0].device_kind,
        memory_bytes=int(spec["hbm_gib"] * 2**30),
        device_memory_bytes=int(spec["hbm_gib"] * 2**30),
        num_processes=len({d.process_index for d in devices}),
    )


def _libtpu_message(name: str, e: Exception) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if "libtpu" in text.lower() or "no module" in text.lower() or "unknown backend" in text.lower():
        return (
            f"--target={name}: TPU targets need libtpu: pip install -e '.[aot]' (or make install-aot) "
            f"({text})"
        )
    return f"--target={name}: libtpu cannot describe this topology ({text})"


def gpu_spec_path(name: str) -> str:
    path = os.path.join(GPU_SPECS_DIR, GPU_CARDS[name]) if name in GPU_CARDS else name
    if not os.path.isfile(path):
        raise ConfigError(f"--target={name}: no GPU description at {path}")
    return path


def _gpu(name: str, gpus_per_host: int, hosts: int) -> Target:
    from jax.experimental import topologies

    path = gpu_spec_path(name)
    with open(path) as f:
        spec = f.read()
    memory = re.search(r"device_memory_size:\s*(\d+)", spec)
    if memory is None:
        raise ConfigError(f"--target={name}: {path} gives no gpu_device_info.device_memory_size")
    try:
        topology = topologies.get_topology_desc(
            platform="cuda",
            topology_name="gpu",
            target_config=spec,
            topology=f"1x{hosts}x{gpus_per_host}",
        )
    except Exception as e:  # noqa: BLE001 -- no CUDA plugin, or a description this jaxlib refuses
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = " (GPU targets need the CUDA plugin: pip install -e '.[aot]' or make install-aot)"
        raise ConfigError(f"--target={name}: cannot set up the CUDA compiler: {text}{hint}") from None
    devices = tuple(topology.devices)
    fraction = memory_fraction()
    return Target(
        name=f"{hosts}x{gpus_per_host} {name}" if hosts > 1 else f"{gpus_per_host}x {name}",
        platform="cuda",
        devices=devices,
        device_kind=devices[0].device_kind,
        memory_bytes=int(int(memory.group(1)) * fraction),
        num_processes=len({d.process_index for d in devices}),
        device_memory_bytes=int(memory.group(1)),
    )


def memory_fraction() -> float:
    """The share of a GPU's memory JAX's allocator takes: ``XLA_PYTHON_CLIENT_MEM_FRACTION``, else 0.75."""
    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r}: expected a fraction in (0, 1]")
    return fraction

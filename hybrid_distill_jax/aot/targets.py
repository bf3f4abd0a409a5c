"""Hardware this host does not have, as compile-only devices: TPU slices (libtpu) and NVIDIA GPUs (the
CUDA PJRT plugin with a device description), for ``jax.jit(...).lower(...).compile()`` without a device.

``--target`` names one of:

* a TPU slice, ``GENERATION:TOPOLOGY`` as Cloud TPU writes it: ``v4:2x2x2``, ``v5e:16x16``,
  ``v5p:4x4x4``, ``v6e:8x8``, ``tpu7x:2x2x1`` (with ``num_slices`` for multi-slice), or an accelerator
  type as ``gcloud`` takes it (``v4-32``, ``v5p-64``, ``v5litepod-16``, ``v6e-16``: the slice's default
  topology). v4 compiles with one device per chip (megacore), as the TPU runtime presents it.
* a GPU card by name (``h100-sxm``, ``h200``: the files in ``gpu_specs/``) or the path of a
  ``GpuTargetConfigProto`` text file, with ``gpus_per_host`` GPUs on each of ``hosts`` hosts. The file is
  user input, checked before XLA reads it (:func:`gpu_spec`): XLA's compiler takes a field it lacks as 0,
  and dies on some of them without a word.

``describe(...)`` returns a :class:`Target`: the compile-only devices, how many processes (hosts) own
them, and the memory a program may use on each: a TPU's HBM; a GPU's memory times
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX's default 0.75; ``launch/env.sh`` sets 0.90), the pool JAX's
allocator takes up front. :func:`prepare_environment` must run before JAX is imported: JAX then
uses the CPU as its runtime and never looks for a real accelerator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile

from hybrid_distill_jax import errors
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

    spec, memory = gpu_spec(name)
    try:
        with _stderr_captured() as logged:
            topology = topologies.get_topology_desc(
                platform="cuda",
                topology_name="gpu",
                target_config=spec,
                topology=f"1x{hosts}x{gpus_per_host}",
            )
    except Exception as e:  # noqa: BLE001 -- no CUDA plugin, or a description this jaxlib refuses
        refused = [m for m in map(_XLA_PARSE_ERROR.search, logged) if m]
        if refused:  # e.g. a field this jaxlib does not know
            line, column, what = refused[0].groups()
            where = f"{_where(name)}: XLA cannot read it: line {line}, column {column}"
            raise ConfigError(f"{where}: {what}") from None
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
        memory_bytes=int(memory * fraction),
        num_processes=len({d.process_index for d in devices}),
        device_memory_bytes=memory,
    )


# The limits, sizes and rates XLA's GPU compiler plans kernels, launch grids and costs with: each a positive
# number on every card (True: an integer). A field missing is 0 to the compiler: without threads_per_warp or
# block_dim_limit_x the tiny recipe's compile died of SIGFPE, without threads_per_block_limit or
# shared_memory_per_block of SIGSEGV, printing nothing; without shared_memory_per_block_optin (or the compute
# capability) XLA failed with a traceback; the others describe no card. device_memory_size is also what the
# fit check allows.
GPU_DEVICE_INFO = {
    "threads_per_block_limit": True,
    "threads_per_warp": True,
    "shared_memory_per_block": True,
    "shared_memory_per_core": True,
    "threads_per_core_limit": True,
    "core_count": True,
    "fpus_per_core": True,
    "block_dim_limit_x": True,
    "block_dim_limit_y": True,
    "block_dim_limit_z": True,
    "memory_bandwidth": True,
    "l2_cache_size": True,
    "clock_rate_ghz": False,
    "device_memory_size": True,
    "shared_memory_per_block_optin": True,
    "registers_per_core_limit": True,
    "registers_per_block_limit": True,
    "thread_dim_limit_x": True,
    "thread_dim_limit_y": True,
    "thread_dim_limit_z": True,
}
# What XLA logs for a description it cannot parse (to stderr, beside its exception, which says less).
_XLA_PARSE_ERROR = re.compile(r"Error parsing text-format \S*GpuTargetConfigProto: (\d+):(\d+): (.*)")


def _where(name: str) -> str:
    """How a message names GPU target ``name``: the flag, and the file a card name stands for."""
    path = gpu_spec_path(name)
    return f"--target={name}" if path == name else f"--target={name} ({path})"


def gpu_spec(name: str) -> tuple[str, int]:
    """(the text, device_memory_size) of GPU target ``name``'s description, checked as user input before
    XLA reads it: text format, a ``gpu_device_info`` holding every ``GPU_DEVICE_INFO`` field once, positive
    and of its type, and a ``cuda_compute_capability`` with a positive ``major``. Anything else is a
    ConfigError naming the flag, the file and the field. Plain Python: ``compile`` checks the description
    before JAX loads."""
    where = _where(name)
    data = errors.read_bytes(gpu_spec_path(name), ConfigError, where)
    try:
        text = data.decode()
        fields = parse_text_proto(text)
    except UnicodeDecodeError as e:
        reason = f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}"
        raise ConfigError(f"{where}: not a GPU description (GpuTargetConfigProto text): {reason}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: not a GPU description (GpuTargetConfigProto text): {e}") from None
    info = _one_message(fields, "gpu_device_info", where)
    missing = [field for field in GPU_DEVICE_INFO if field not in info]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"{where}: gpu_device_info.{', '.join(missing[:3])}{more} missing; XLA's GPU compiler needs each "
            "(a description as XLA prints it has them: hybrid_distill_jax/aot/gpu_specs/README.md)"
        )
    values = {field: _positive(info, field, integer, where) for field, integer in GPU_DEVICE_INFO.items()}
    capability = _one_message(info, "cuda_compute_capability", where, "gpu_device_info.")
    _positive(capability, "major", True, where, "gpu_device_info.cuda_compute_capability.")
    return text, values["device_memory_size"]


def _one_message(fields: dict, name: str, where: str, prefix: str = "") -> dict:
    given = fields.get(name, [])
    if len(given) != 1 or not isinstance(given[0], dict):
        what = "missing" if not given else "given more than once" if len(given) > 1 else "not a message"
        raise ConfigError(f"{where}: {prefix}{name} {{ ... }} {what}; a GPU description needs it once")
    return given[0]


def _positive(fields: dict, name: str, integer: bool, where: str, prefix: str = "gpu_device_info."):
    """``fields[name]``'s one value: a positive, finite number and, if ``integer``, an integer."""
    given = fields.get(name, [])
    kind = "a positive integer" if integer else "a positive number"
    if len(given) != 1:
        raise ConfigError(f"{where}: {prefix}{name} is {'missing' if not given else 'given more than once'}")
    token = given[0]
    if isinstance(token, dict):
        raise ConfigError(f"{where}: {prefix}{name} must be {kind}, got a message {{ ... }}")
    value = None
    if token.kind == "number" and integer and re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+|\d+)", token.text):
        value = int(token.text, 16 if "x" in token.text.lower() else 10)
    elif token.kind in ("number", "name") and not integer:
        with contextlib.suppress(ValueError):
            value = float(token.text.rstrip("fF") if token.kind == "number" else token.text)
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {prefix}{name} must be {kind}, got {token.text} (line {token.line})")
    return value


@dataclasses.dataclass(frozen=True)
class Token:
    kind: str  # 'string', 'number', 'name', 'symbol' or 'end'
    text: str
    line: int


_TOKEN = re.compile(
    r"""(?P<skip>[ \t\r\f\v]+|\#[^\n]*)|(?P<newline>\n)
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?)|-(?i:inf(?:inity)?|nan)\b)
    |(?P<name>[A-Za-z_]\w*)|(?P<symbol>[{}<>:;,\[\]])""",
    re.VERBOSE,
)
_CLOSING = {"{": "}", "<": ">"}


def parse_text_proto(text: str) -> dict:
    """A protocol buffer in text format as {field: [value, ...]}, each value a :class:`Token` or, for a
    nested message, a dict of the same kind. Field names are not checked against a schema (XLA does
    that). ValueError('line N: ...') where the text is not in that format."""
    tokens, line, pos = [], 1, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"line {line}: unexpected {text[pos]!r}")
        if match.lastgroup == "newline":
            line += 1
        elif match.lastgroup != "skip":
            tokens.append(Token(match.lastgroup, match.group(), line))
        pos = match.end()
    tokens.append(Token("end", "the end of the file", line))
    fields, _ = _parse_message(tokens, 0, "end")
    return fields


def _parse_message(tokens: list, i: int, closing: str, opened: Token | None = None) -> tuple[dict, int]:
    """The fields from ``tokens[i]`` up to the symbol ``closing`` ('end': the end of the file) of the
    message the field ``opened`` opened, and the index after it."""
    fields: dict = {}
    while True:
        token = tokens[i]
        if token.kind == closing or (token.kind == "symbol" and token.text == closing):
            return fields, i + 1
        if token.kind == "end":
            raise ValueError(f"line {opened.line}: {opened.text} {{ is never closed (no {closing!r})")
        if token.kind != "name":
            raise ValueError(f"line {token.line}: expected a field name, got {token.text!r}")
        colon = tokens[i + 1].text == ":"
        i += 2 if colon else 1
        if colon and tokens[i].text == "[":  # a list: [1, 2] or [{...}, {...}]
            i += 1
            while tokens[i].text != "]":
                value, i = _parse_value(tokens, i, token, scalar=True)
                fields.setdefault(token.text, []).append(value)
                if tokens[i].text == ",":
                    i += 1
                elif tokens[i].text != "]":
                    raise ValueError(f"line {tokens[i].line}: expected ',' or ']', got {tokens[i].text!r}")
            i += 1
        else:
            value, i = _parse_value(tokens, i, token, scalar=colon)
            fields.setdefault(token.text, []).append(value)
        if tokens[i].text in (";", ","):
            i += 1


def _parse_value(tokens: list, i: int, field: Token, *, scalar: bool) -> tuple:
    """The value of ``field`` at ``tokens[i]`` and the index after it: a nested message, or (``scalar``:
    after a colon) a number, a name or a string (adjacent strings are one)."""
    token = tokens[i]
    if token.kind == "symbol" and token.text in _CLOSING:
        return _parse_message(tokens, i + 1, _CLOSING[token.text], field)
    if scalar and token.kind in ("number", "name"):
        return token, i + 1
    if scalar and token.kind == "string":
        while tokens[i + 1].kind == "string":
            i += 1
        return token, i + 1
    expected = "a value" if scalar else "':' or '{'"
    raise ValueError(f"line {token.line}: expected {expected} after {field.text!r}, got {token.text!r}")


@contextlib.contextmanager
def _stderr_captured():
    """Collects what is written to file descriptor 2, where XLA logs (for a description it cannot parse:
    the line, column and field), into the list it yields: kept off stderr when the block raises (the caller
    says it in its one line), written there when it does not."""
    sys.stderr.flush()
    saved = os.dup(2)
    logged: list[str] = []
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield logged
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            data = capture.read()
            logged.extend(data.decode(errors="replace").splitlines())
            if not failed:
                os.write(2, data)


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

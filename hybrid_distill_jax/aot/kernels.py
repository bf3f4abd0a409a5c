"""The kernel plan of a compiled GPU program, read from its optimized HLO text (``compiled.as_text()``).

XLA names the library kernels it calls as custom-call targets: cuBLAS(Lt) GEMMs (``__cublas$lt$matmul``,
``__cublas$gemm``; ``...$f8`` with fp8 operands), cuDNN fused attention (``__cudnn$fmha...``) and
convolutions (``__cudnn$conv...``). A call's operands are named, not typed, so every instruction's
result type is read first and a GEMM's operand dtypes are looked up by name. Counts are of calls in the
program text: the body of a loop (gradient accumulation) is counted once.
"""

from __future__ import annotations

import collections
import re

_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+) = (.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CALLS = re.compile(r"\bcalls=%([^\s,)]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)\s*\(")
_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
)
BYTES_PER_ELEMENT = {"pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
BYTES_PER_ELEMENT.update({"s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2})
BYTES_PER_ELEMENT.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2]{0}, s8[4]{0}) custom-call(...)' -> ('(f32[2]{0}, s8[4]{0})', 'custom-call(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].strip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)]


def _operands(op_text: str) -> list[str]:
    """The named operands of 'custom-call(%a, %b.1), ...'."""
    start = op_text.find("(")
    depth, end = 0, len(op_text)
    for i in range(start, len(op_text)):
        depth += op_text[i] == "("
        depth -= op_text[i] == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([^\s,)]+)", op_text[start:end])


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = BYTES_PER_ELEMENT.get(dtype, 1 if dtype.startswith("f8") else 4)
    for d in shape:
        n *= d
    return n


def hlo_instructions(hlo_text: str):
    """Yields ``(computation, name, result type text, op text)`` for every instruction of an HLO module."""
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            computation = header.group(1)
            continue
        definition = _DEFINITION.match(line)
        if definition:
            name, rest = definition.groups()
            yield (computation, name, *_split_type(rest))


def fused_computations(op_text: str) -> list[str]:
    """The computations a ``fusion(...)`` instruction calls (none for another op)."""
    return _CALLS.findall(op_text) if op_text.startswith("fusion(") else []


def custom_call_target(op_text: str) -> str | None:
    target = _TARGET.search(op_text)
    return target.group(1) if target else None


def plan(hlo_text: str, largest: int = 8) -> dict:
    """GEMM calls by operand dtypes and by kernel, fused-attention and convolution calls, collectives,
    and the ``largest`` buffers (results of instructions outside fused computations)."""
    types: dict[str, str] = {}
    instructions = list(hlo_instructions(hlo_text))
    fused: set[str] = set()
    for _, name, type_text, op_text in instructions:
        types[name] = type_text
        fused.update(fused_computations(op_text))

    gemms_by_dtype: collections.Counter = collections.Counter()
    gemms_by_kernel: collections.Counter = collections.Counter()
    attention: collections.Counter = collections.Counter()
    convolutions: collections.Counter = collections.Counter()
    collectives: collections.Counter = collections.Counter()
    triton_gemm_fusions = 0
    buffers = []
    for computation, name, type_text, op_text in instructions:
        op = op_text.partition("(")[0]
        kernel = custom_call_target(op_text)
        if kernel:
            if kernel.startswith(("__cublas$", "__cublas$lt$")):
                operand_dtypes = [_arrays(types.get(o, ""))[:1] for o in _operands(op_text)[:2]]
                dtypes = [a[0][0] for a in operand_dtypes if a]
                gemms_by_dtype[" x ".join(dtypes) or "?"] += 1
                gemms_by_kernel[kernel] += 1
            elif kernel.startswith("__cudnn$fmha"):
                attention[kernel] += 1
            elif kernel.startswith("__cudnn$conv"):
                convolutions[kernel] += 1
        if op == "fusion" and "__triton_gemm" in op_text:
            triton_gemm_fusions += 1
        base = op.removesuffix("-start").removesuffix("-done")
        if base in _COLLECTIVES and not op.endswith("-done"):
            collectives[base] += 1
        if computation not in fused and op not in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            arrays = _arrays(type_text)
            if kernel and len(arrays) > 1:  # a library call's last result is its scratch workspace
                arrays = arrays[:-1]
            for dtype, shape in arrays:
                buffers.append((_nbytes(dtype, shape), name, dtype, shape, op))
    buffers.sort(key=lambda b: -b[0])
    return {
        "gemm_calls": sum(gemms_by_kernel.values()),
        "gemm_calls_by_operand_dtype": dict(gemms_by_dtype.most_common()),
        "gemm_calls_by_kernel": dict(gemms_by_kernel.most_common()),
        "triton_gemm_fusions": triton_gemm_fusions,
        "fused_attention_calls": dict(attention.most_common()),
        "convolution_calls": dict(convolutions.most_common()),
        "collectives": dict(collectives.most_common()),
        "largest_buffers": [
            {"name": n, "dtype": dt, "shape": list(shape), "bytes": nbytes, "op": op}
            for nbytes, n, dt, shape, op in buffers[:largest]
        ],
    }


def describe(kernel_plan: dict) -> list[str]:
    """The plan as a few readable lines."""
    fmt = lambda counts: ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"  # noqa: E731
    lines = [
        f"GEMM calls: {kernel_plan['gemm_calls']} (by operand dtype: "
        f"{fmt(kernel_plan['gemm_calls_by_operand_dtype'])}; "
        f"by kernel: {fmt(kernel_plan['gemm_calls_by_kernel'])})",
        f"Triton GEMM fusions: {kernel_plan['triton_gemm_fusions']}",
        f"fused attention calls: {fmt(kernel_plan['fused_attention_calls'])}",
        f"convolution calls: {fmt(kernel_plan['convolution_calls'])}",
        f"collectives: {fmt(kernel_plan['collectives'])}",
        "largest buffers:",
    ]
    for b in kernel_plan["largest_buffers"]:
        lines.append(f"  {b['dtype']}{b['shape']} {b['bytes'] / 2**20:.1f} MiB ({b['op']} {b['name']})")
    return lines

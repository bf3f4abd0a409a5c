"""Where a step's device time goes: a ``jax.profiler`` trace summarised as time per kind of op.

    python benchmarks/throughput.py --quick --no-peer --keep 0.5 --profile DIR   # traces and summarises
    python benchmarks/profile_summary.py DIR/<run> --steps 3                      # summarises a trace again

``trace_steps`` runs a few steps under ``jax.profiler`` (``*.xplane.pb`` under the log directory);
``summarize`` reads that file with ``jax.profiler.ProfileData`` (no TensorBoard, no protobuf module) and
adds up the device ops' own time (an op's duration less the ops nested in it, such as a ``while``'s
body) by kind, per step. Which events are the device's ops:

- a ``/device:*`` plane (GPU, TPU): the events of its ``Stream ...`` lines (GPU kernels and copies as
  CUPTI records them), else of its ``XLA Ops`` line (TPU), else of all its lines;
- no device plane with events (the CPU back end): the host events that carry an ``hlo_op`` stat (the
  thunks XLA's CPU runtime runs, on several threads at once).

Events naming another HLO module than the step's (``HloModule`` of ``hlo_text``) are left out. Each op is
classified by :func:`classify` from its kernel name, its ``hlo_op`` and, given the step's optimized HLO
(``compiled.as_text()``), that instruction's opcode, custom-call target and whether a fusion computes a
dot or a convolution (``hlo_descriptions``): XLA's CPU back end names its matmul fusions ``ynn_fusion``.

The GPU rules are written from the names XLA, cuBLAS, cuDNN and NCCL give their kernels; no GPU has run
them yet (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import time

# (kind, pattern) in order: the first pattern found in the lower-cased description of an op names its kind.
KIND_RULES = (
    (
        "collective",
        r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|collective[-_]?permute",
    ),
    ("attention", r"fmha|flash|sdpa|attention"),
    ("gemm", r"cublas|gemm|matmul|cutlass|xmma|nvjet|(^|[^a-z])(dot|convolution)([^a-z]|$)|\$conv"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("fusion", r"fusion|wrapped_|triton"),
)
# The kinds in the order the summaries list them.
KINDS = ("gemm", "attention", "fusion", "copy/transpose", "collective", "other")
_RULES = tuple((kind, re.compile(pattern)) for kind, pattern in KIND_RULES)
_MODULE = re.compile(r"^HloModule ([^\s,]+)", re.M)
_FUSION_KIND = re.compile(r'"kind":"(__[^"]+)"')
_DOT_LIKE = ("dot", "convolution")


def classify(description: str) -> str:
    """The kind (one of :data:`KINDS`) of an op from its description: kernel name, HLO op name and what
    ``hlo_descriptions`` says of it, space-separated. GEMM covers matmuls and convolutions (cuBLAS,
    cuDNN, CUTLASS, Triton GEMM fusions, XLA dots); attention is fused attention (cuDNN, flash);
    fusion is every other XLA fusion (element-wise, reductions); other is the rest (loops' own time,
    sorts, random bits, unknown library calls)."""
    text = description.lower()
    return next((kind for kind, rule in _RULES if rule.search(text)), "other")


def hlo_descriptions(hlo_text: str) -> dict[str, str]:
    """``{instruction name: description}`` for every instruction of an optimized HLO module: its opcode,
    a custom call's target, a fusion's backend kind (``__triton_gemm``, ``__ynn_fusion``...) and
    ``computes:dot`` / ``computes:convolution`` when its fused computations (nested ones included) do."""
    from hybrid_distill_jax.aot.kernels import custom_call_target, fused_computations, hlo_instructions

    opcodes: dict[str, set[str]] = collections.defaultdict(set)  # computation -> opcodes in it
    calls: dict[str, set[str]] = collections.defaultdict(set)  # computation -> computations it fuses
    instructions = []  # (name, op text)
    for computation, name, _, op_text in hlo_instructions(hlo_text):
        opcodes[computation].add(op_text.partition("(")[0])
        calls[computation].update(fused_computations(op_text))
        instructions.append((name, op_text))

    def computes(computation: str, seen: set[str]) -> set[str]:
        seen.add(computation)
        found = opcodes[computation] & set(_DOT_LIKE)
        for callee in calls[computation] - seen:
            found |= computes(callee, seen)
        return found

    out = {}
    for name, op_text in instructions:
        opcode = op_text.partition("(")[0]
        words = [opcode]
        target = custom_call_target(op_text)
        if target:
            words.append(target)
        if opcode == "fusion":
            kind = _FUSION_KIND.search(op_text)
            words += [kind.group(1)] if kind else []
            fused = set()
            for callee in fused_computations(op_text):
                fused |= computes(callee, set())
            words += [f"computes:{op}" for op in sorted(fused)]
        out[name] = " ".join(words)
    return out


def trace_steps(step, state, steps: int, log_dir: str):
    """Runs ``state, out = step(state)`` ``steps`` times under ``jax.profiler`` into ``log_dir`` and waits
    for the last ``out``; returns (state, wall seconds per step, the ``*.xplane.pb`` written)."""
    import jax

    os.makedirs(log_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))
    jax.profiler.start_trace(log_dir)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = step(state)
        jax.block_until_ready(out)
        seconds = (time.perf_counter() - t0) / steps
    finally:
        jax.profiler.stop_trace()
    (written,) = set(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)) - before
    return state, seconds, written


def device_ops(xplane_path: str, module: str | None = None) -> tuple[list[tuple], list[str], int]:
    """The devices' op events of a trace, as (line, description, hlo_op or None, start ns, end ns), the
    names of the lines they came from (see the module docstring for which events those are) and the
    number of devices they ran on (device planes; on the host, distinct ``device_ordinal`` stats)."""
    from jax.profiler import ProfileData

    profile = ProfileData.from_file(xplane_path)
    picked = []  # (plane name, line name, events)
    for plane in profile.planes:
        if plane.name.startswith("/device:"):
            lines = [(line.name, list(line.events)) for line in plane.lines]
            lines = [(name, events) for name, events in lines if events]
            chosen = [ln for ln in lines if ln[0].startswith("Stream")]
            chosen = chosen or [ln for ln in lines if ln[0] == "XLA Ops"]
            picked += [(plane.name, name, events) for name, events in chosen or lines]
    if not picked:  # the CPU back end runs the ops itself, on host threads
        for plane in profile.planes:
            for line in plane.lines if plane.name.startswith("/host:") else ():
                events = [e for e in line.events if "hlo_op" in dict(e.stats)]
                picked += [(plane.name, line.name, events)] if events else []
    ops, devices = [], set()
    for plane_name, line_name, events in picked:
        for e in events:
            stats = dict(e.stats)
            if module and stats.get("hlo_module", module) != module:
                continue
            devices.add((plane_name, stats.get("device_ordinal")))
            hlo_op = stats.get("hlo_op")
            description = f"{e.name} {hlo_op}" if hlo_op and hlo_op != e.name else e.name
            ops.append(((plane_name, line_name), description, hlo_op, e.start_ns, e.end_ns))
    return ops, sorted({f"{p} {ln}" for p, ln, _ in picked}), max(len(devices), 1)


def self_times(ops: list[tuple]) -> list[float]:
    """Each op's own nanoseconds: its duration less that of the ops nested in it on the same line."""
    own = [end - start for _, _, _, start, end in ops]
    by_line = collections.defaultdict(list)
    for i, (line, _, _, start, end) in enumerate(ops):
        by_line[line].append((start, -end, i))
    for events in by_line.values():
        stack = []  # (end, index) of the ops that contain the current one
        for start, neg_end, i in sorted(events):
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                own[stack[-1][1]] -= -neg_end - start
            stack.append((-neg_end, i))
    return own


def summarize(xplane_path: str, steps: int, hlo_text: str | None = None, top: int = 12) -> dict:
    """Time per kind of op, per step and device, of a trace of ``steps`` steps (``trace_steps``).

    ``busy_ms_per_step`` adds up every op's own time over the ``devices`` traced and divides by them (it
    can exceed the wall time where a device runs ops at once: CPU threads, GPU streams);
    ``span_ms_per_step`` is first op start to last op end over ``steps``. Each kind has its
    ``ms_per_step`` and ``pct`` of the busy time, and the kinds add up to the busy time. ``top_ops`` are
    the ops with the most own time (by HLO op name, else kernel name)."""
    module = _MODULE.search(hlo_text).group(1) if hlo_text and _MODULE.search(hlo_text) else None
    described = hlo_descriptions(hlo_text) if hlo_text else {}
    ops, lines, devices = device_ops(xplane_path, module)
    own = self_times(ops)
    per_kind = dict.fromkeys(KINDS, 0.0)
    per_op: dict[str, list] = {}
    for (_, description, hlo_op, _, _), ns in zip(ops, own):
        kind = classify(f"{description} {described.get(hlo_op, '')}")
        per_kind[kind] += ns
        entry = per_op.setdefault(hlo_op or description, [kind, 0.0, 0])
        entry[1] += ns
        entry[2] += 1
    busy = sum(per_kind.values())
    span = (max(o[4] for o in ops) - min(o[3] for o in ops)) if ops else 0.0
    ms = lambda ns: round(ns / steps / devices / 1e6, 4)  # noqa: E731 -- per step and device
    return {
        "trace": xplane_path,
        "steps": steps,
        "module": module,
        "lines": lines,
        "devices": devices,
        "ops_per_step": round(len(ops) / steps / devices, 1),
        "busy_ms_per_step": ms(busy),
        "span_ms_per_step": round(span / steps / 1e6, 4),
        "kinds": {
            k: {"ms_per_step": ms(v), "pct": round(100 * v / busy, 1) if busy else 0.0}
            for k, v in per_kind.items()
        },
        "top_ops": [
            {"op": name, "kind": kind, "ms_per_step": ms(ns), "calls_per_step": round(n / steps / devices, 1)}
            for name, (kind, ns, n) in sorted(per_op.items(), key=lambda item: -item[1][1])[:top]
        ],
    }


def profile_steps(step, state, steps: int, log_dir: str, hlo_text: str | None = None):
    """Traces ``steps`` steps (``trace_steps``) into ``log_dir`` and summarises them (``summarize``),
    writing ``summary.json`` there and ``step.hlo.txt`` (``hlo_text``, which the command line reads
    back). Returns (state, summary); ``summary['traced_step_ms']`` is the wall time per step under the
    profiler, ``summary['profile_s']`` what tracing, writing and summarising took in all. A trace that
    cannot be summarised gives ``{'error': ...}`` (and the trace stays there to read again), so that
    the state the steps returned is never lost to a parsing failure."""
    t0 = time.perf_counter()
    state, seconds, trace = trace_steps(step, state, steps, log_dir)
    if hlo_text:
        with open(os.path.join(log_dir, "step.hlo.txt"), "w") as f:
            f.write(hlo_text)
    try:
        summary = dict(summarize(trace, steps, hlo_text), traced_step_ms=round(seconds * 1e3, 4))
    except Exception as e:  # a diagnostic: the caller's timing and state stand without it
        summary = {"trace": trace, "steps": steps, "error": f"{type(e).__name__}: {e}"}
    summary["profile_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(log_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return state, summary


def describe(summary: dict) -> list[str]:
    """The summary as a markdown table of the kinds, then the top ops (or the error that stopped it)."""
    if "error" in summary:
        return [f"no summary of {summary['trace']}: {summary['error']}"]
    devices = f" (mean of {summary['devices']} devices)" if summary["devices"] > 1 else ""
    lines = [
        f"device time per step{devices}: "
        f"{summary['busy_ms_per_step']} ms busy, {summary['span_ms_per_step']} ms first to last op "
        f"({summary['ops_per_step']} ops per step, {summary['steps']} steps traced)",
        "| kind | ms/step | % |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['ms_per_step']} | {v['pct']} |" for k, v in summary["kinds"].items()]
    top = (f"{o['op']} ({o['kind']}) {o['ms_per_step']} ms" for o in summary["top_ops"])
    lines.append("top ops: " + "; ".join(top))
    return lines


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log_dir", help="a trace directory (its newest *.xplane.pb is read)")
    ap.add_argument("--steps", type=int, required=True, help="how many steps the trace holds")
    ap.add_argument("--hlo", default="", help="the step's optimized HLO text (default: LOG_DIR/step.hlo.txt)")
    ap.add_argument("--json", default="", help="also write the summary to this JSON file")
    a = ap.parse_args(argv)
    traces = glob.glob(os.path.join(a.log_dir, "**", "*.xplane.pb"), recursive=True)
    if not traces:
        print(f"error: no *.xplane.pb under {a.log_dir}", file=sys.stderr)
        return 2
    hlo_path = a.hlo or os.path.join(a.log_dir, "step.hlo.txt")
    hlo_text = open(hlo_path).read() if os.path.exists(hlo_path) else None
    summary = summarize(max(traces, key=os.path.getmtime), a.steps, hlo_text)
    print("\n".join(describe(summary)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

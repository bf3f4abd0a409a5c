"""Throughput of one full Hybrid Distill training step, beside the PyTorch peer on the same card.

    python benchmarks/throughput.py                       # ViT-B/16 student + 2 ViT-B/16 teachers, 224 px,
                                                          # bf16, batch 256 per chip, keep 0.5 and 1.0, peers
    python benchmarks/throughput.py --quick               # fewer steps, one torch.compile run
    python benchmarks/throughput.py --data DIR --no-peer  # also end to end from DIR/train/<class>/*.jpg
    python benchmarks/throughput.py --preset l16 --fsdp -1 --remat_policy dots_saveable --no-peer
                                                          # ViT-L/16 from CLIP-L/14 (196 px) + MAE-L/16
    python benchmarks/throughput.py --cpu-smoke           # tiny models on the CPU: proves the script runs

The step is the trainer's: the config comes from ``config_lib.base_config('distill')`` with the preset and
flags applied, the task from ``tasks.build_task`` (random-init teachers exported to a temporary directory
and loaded like real ones), the step from ``train.step.make_train_step`` jitted by ``train.step.jit_step``.
It runs on a synthetic uint8 batch (images as the input pipeline ships them); with ``--data`` it then runs
the same compiled step fed by the product's input pipeline (``data.train_iterator`` + device prefetch)
and reports that end-to-end img/s beside the synthetic figure.

Printed per keep ratio: img/s (global and per chip), step time, model FLOPs per image (analytic matmul
count and XLA's cost analysis), MFU against a bf16 matmul peak measured in the same run, peak device
memory, and the ratio to each PyTorch peer (``benchmarks/torch_peer.py``, run first, in subprocesses,
before JAX takes the GPU memory). Imports nothing but the standard library until it runs; TensorFlow
only with ``--data``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEER_DEFAULT = os.path.join(HERE, "torch_peer.py")

# name -> (student arch, feature-teacher arch, feature-teacher image size, relation-teacher arch, image size)
PRESETS = {
    "b16": (
        dict(variant="B/16"),
        dict(variant="B/16"),
        224,
        dict(variant="B/16"),
        224,
    ),
    # CLIP ViT-L/14 (ln_pre, QuickGELU, projection) fed 196 px so its 14x14 grid matches the /16 student's.
    "l16": (
        dict(variant="L/16"),
        dict(variant="L/14", ln_pre=True, act="quick_gelu", proj_dim=768),
        196,
        dict(variant="L/16"),
        224,
    ),
    "tiny": (dict(variant="nano/8"), dict(variant="nano/8"), 32, dict(variant="nano/8"), 32),
}


class AttrDict(dict):
    """What DistillTask uses of a ConfigDict (attributes, .get, .items), without ml_collections."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def as_attr(tree):
    if isinstance(tree, dict):
        return AttrDict({k: as_attr(v) for k, v in tree.items()})
    return tree


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="b16")
    ap.add_argument("--batch", type=int, default=256, help="per-chip batch (global = batch x chips)")
    ap.add_argument("--keep", default="0.5,1.0", help="comma-separated keep ratios (1 - mask ratio)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per keep ratio")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    ap.add_argument("--accum", type=int, default=1, help="grad_accum_steps (micro-batches per step)")
    ap.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (-1: all chips); >1 splits params")
    ap.add_argument(
        "--remat_policy", default="none", help="student.remat_policy (none, full, dots_saveable...)"
    )
    ap.add_argument("--student_dtype", default="bfloat16", help="student compute dtype (params stay fp32)")
    ap.add_argument("--teacher_dtype", default="bfloat16")
    ap.add_argument(
        "--teacher_attn_impl",
        default="",
        choices=("", "xla", "cudnn"),
        help="fused attention kernel of the frozen teachers (teachers.*.attn_impl); cudnn on NVIDIA GPUs",
    )
    ap.add_argument("--relation_on_kept", action="store_true", help="loss.relation_teacher_on_kept=True")
    ap.add_argument("--drop_path", type=float, default=0.0, help="student drop-path (the peer has none)")
    ap.add_argument("--peer", default=PEER_DEFAULT, help="path of torch_peer.py")
    ap.add_argument("--no-peer", dest="peer_run", action="store_false", help="skip the PyTorch peers")
    ap.add_argument("--peer-compile-keeps", default="0.5", help="keep ratios for the torch.compile peer")
    ap.add_argument("--matmul", type=int, default=8192, help="n of the n x n x n bf16 matmul peak probe")
    ap.add_argument("--quick", action="store_true", help="5 timed steps, 2 warm-up, 10 peer steps")
    ap.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true", help="tiny models on the CPU")
    ap.add_argument(
        "--data", default="", help="also time the step fed by the input pipeline from this folder"
    )
    ap.add_argument("--json", default="", help="also write all results to this JSON file")
    ap.add_argument(
        "--teachers_dir", default="", help="export the random-init teachers here once and reuse them"
    )
    a = ap.parse_args(argv)
    a.keeps = [float(k) for k in a.keep.split(",") if k]
    a.peer_compile = [float(k) for k in a.peer_compile_keeps.split(",") if k]
    a.peer_steps = 20
    if a.quick:
        a.steps, a.warmup, a.peer_steps = 5, 2, 10
    if a.cpu_smoke:
        a.preset, a.batch, a.steps, a.warmup, a.matmul, a.peer_run = "tiny", 8, 2, 1, 256, False
    return a


# ---- PyTorch peers -----------------------------------------------------------------------------------
def run_peer(path: str, batch: int, keep: float, steps: int, compile_: bool) -> dict:
    cmd = [sys.executable, path, "--batch", str(batch), "--keep", str(keep), "--steps", str(steps)]
    cmd += ["--compile"] if compile_ else []
    name = "torch-compile" if compile_ else "torch-eager"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"impl": name, "keep": keep, "error": "timed out after 900 s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"impl": name, "keep": keep, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# ---- JAX -----------------------------------------------------------------------------------------------
def matmul_peak(n: int, reps: int = 20) -> float:
    """Measured bf16 matmul FLOP/s of one chip (n x n x n, fp32 accumulation), best of 3."""
    import jax
    import jax.numpy as jnp

    dev = jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16), dev)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n**0.5, dev)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, reps, lambda _, y: jnp.dot(y, w).astype(jnp.bfloat16), x)

    chain(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def export_teachers(args, root: str) -> dict:
    """Random-init teachers of the preset exported under ``root`` (loaded back like real ones); a teacher
    already exported there (``--teachers_dir``, shared by several invocations) is reused."""
    import jax
    import jax.numpy as jnp

    from hybrid_distill_jax.models import io as model_io
    from hybrid_distill_jax.models.vit import make_vit

    _, feature, feature_size, relation, image_size = PRESETS[args.preset]
    out = {}
    for i, (role, arch, size) in enumerate(
        (("feature", feature, feature_size), ("relation", relation, image_size))
    ):
        directory = os.path.join(root, args.preset, role)
        if os.path.exists(os.path.join(directory, "model.json")):
            out[role] = directory
            continue
        model = make_vit({**arch, "image_size": size}, dtype=jnp.bfloat16)  # exported at its own size
        params = jax.jit(model.init)(jax.random.key(10 + i), jnp.zeros((1, size, size, 3), jnp.float32))[
            "params"
        ]
        out[role] = model_io.save_model(directory, model, params)
        del params
    return out


def make_config(args, teachers: dict, global_batch: int):
    """The run's config: ``config_lib.base_config('distill')`` with the preset and the flags applied."""
    from hybrid_distill_jax.config_lib import base_config

    student, _, feature_size, _, image_size = PRESETS[args.preset]
    c = base_config("distill")
    c.image_size = image_size
    c.batch_size = global_batch
    c.total_steps = 10_000
    c.optim.warmup_steps = 100
    c.grad_accum_steps = args.accum
    c.student.update(
        dict(
            **student,
            drop_path=args.drop_path,
            dtype=args.student_dtype,
            param_dtype="float32",
            remat_policy=args.remat_policy,
        )
    )
    for role, size in (("feature", feature_size), ("relation", image_size)):
        c.teachers[role].update(
            dict(
                checkpoint=teachers[role],
                dtype=args.teacher_dtype,
                image_size=size,
                attn_impl=args.teacher_attn_impl,
            )
        )
    c.loss.relation_teacher_on_kept = args.relation_on_kept
    c.masking.update(dict(mode="over_training", selection="gumbel", stage_starts=(0.0,), stage_ratios=(0.0,)))
    c.mesh.update(dict(data=1 if args.fsdp == -1 else -1, fsdp=args.fsdp, model=1))
    strategy = "fsdp" if args.fsdp != 1 else "replicated"
    c.sharding.update(dict(student=strategy, teachers=strategy))
    if args.data:
        c.data.update(data_source(args.data))
    return c


def data_source(path: str) -> dict:
    """``config.data`` fields for ``--data``: a folder root (``train/<class>/*.jpg``) or a prepared TFDS
    dataset (a TFDS name, or its directory)."""
    if os.path.isdir(os.path.join(path, "train")):
        return dict(name="folder", data_dir=path, train_split="train", eval_split="train")
    return dict(name=path, data_dir=None, train_split="train", eval_split="train")


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def peak_memory_gb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else None


def host_batches(config, args):
    """The product's training input pipeline for ``--data`` (TensorFlow is imported here, not before)."""
    import jax

    from hybrid_distill_jax.data import train_iterator

    return train_iterator(
        config.data,
        image_size=config.image_size,
        global_batch=config.batch_size,
        seed=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def timed_steps(compiled, state, frozen, batches, warmup: int, steps: int):
    """(state, loss, seconds per step) of ``steps`` steps after ``warmup``, fed from ``batches``."""
    import jax

    for _ in range(warmup):
        state, metrics = compiled(state, frozen, next(batches))
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, next(batches))
    loss = float(metrics["loss"])  # waits for the last step
    return state, loss, (time.perf_counter() - t0) / steps


def run_jax(args) -> dict:
    import itertools

    import jax
    import numpy as np

    from hybrid_distill_jax import masking
    from hybrid_distill_jax.data.prefetch import prefetch_to_device, to_devices
    from hybrid_distill_jax.parallel import sharding
    from hybrid_distill_jax.tasks import build_task
    from hybrid_distill_jax.train.program import build_program, compiled_flops

    chips = jax.device_count()
    kind = jax.devices()[0].device_kind
    print(f"# jax {jax.__version__} on {chips} x {kind} ({jax.default_backend()})", flush=True)
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    peak = matmul_peak(args.matmul)
    print(f"# measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s per chip (n={args.matmul})", flush=True)

    global_batch = args.batch * chips
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        config = make_config(args, export_teachers(args, args.teachers_dir or scratch), global_batch)
        if args.data:  # the data fields need TensorFlow to check: only then
            from hybrid_distill_jax import config_lib

            config_lib.validate(config)
        task = build_task(config, num_classes=0)
    print(f"# teachers ready (exported or reused) and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    mesh = sharding.make_mesh(config.mesh)
    program = build_program(
        config, task, mesh, total_steps=config.total_steps, warmup_steps=config.optim.warmup_steps
    )
    frozen = jax.device_put(task.frozen, program.frozen_shardings)
    batch_sh = program.batch_sharding
    size = config.image_size
    rng = np.random.RandomState(0)
    synthetic = to_devices(  # uint8, as the input pipeline ships images
        {
            "image": rng.randint(0, 256, (global_batch, size, size, 3), dtype=np.uint8),
            "label": np.zeros((global_batch,), np.int32),
        },
        batch_sh,
    )
    data = None
    if args.data:
        data = prefetch_to_device(host_batches(config, args), lambda b: to_devices(b, batch_sh))
    n = task.num_patches
    results = []
    for keep in args.keeps:
        k = masking.keep_count(n, 1.0 - keep)
        state = program.jitted_init()(jax.random.key(0))
        jitted = program.jitted(k)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, frozen, synthetic).compile()
        compile_s = time.perf_counter() - t0
        state, loss, dt = timed_steps(
            compiled, state, frozen, itertools.repeat(synthetic), args.warmup, args.steps
        )
        e2e = None
        if data is not None:
            state, e2e_loss, e2e_dt = timed_steps(compiled, state, frozen, data, args.warmup, args.steps)
            e2e = dict(e2e_img_s=round(global_batch / e2e_dt, 1), e2e_loss=e2e_loss)
        analytic = task.flops_per_example(k)
        xla = compiled_flops(compiled) if args.accum == 1 else None  # XLA counts a scan body once
        img_s = global_batch / dt
        results.append(
            dict(
                impl="jax",
                preset=args.preset,
                keep=keep,
                kept_tokens=k,
                batch_per_chip=args.batch,
                chips=chips,
                step_s=round(dt, 4),
                img_s=round(img_s, 1),
                img_s_per_chip=round(img_s / chips, 1),
                gflop_per_img=sig(analytic["total"] / 1e9),
                gflop_per_img_parts={k2: sig(v / 1e9) for k2, v in analytic.items() if k2 != "total"},
                xla_gflop_per_img=sig(xla / (global_batch / chips) / 1e9) if xla else None,
                mfu=round(analytic["total"] * img_s / (peak * chips), 4),
                peak_gb=peak_memory_gb(),
                compile_s=round(compile_s, 1),
                loss=loss,
                finite=bool(np.isfinite(loss)),
                **(e2e or {}),
            )
        )
        print(json.dumps(results[-1]), flush=True)
        del state, compiled, jitted
    return {"device": kind, "chips": chips, "matmul_peak_tflops": round(peak / 1e12, 1), "runs": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, REPO)
    peers = []
    if args.peer_run:  # before JAX touches the GPU: the peers need its memory
        if not os.path.exists(args.peer):
            print(f"# no peer at {args.peer} (or pass --no-peer)")
        elif args.preset != "b16":
            print("# the PyTorch peer is ViT-B/16 only: no peer for this preset")
        else:
            for keep in args.keeps:
                peers.append(run_peer(args.peer, args.batch, keep, args.peer_steps, compile_=False))
                print(json.dumps(peers[-1]), flush=True)
                if keep in args.peer_compile:
                    peers.append(run_peer(args.peer, args.batch, keep, args.peer_steps, compile_=True))
                    print(json.dumps(peers[-1]), flush=True)
    out = run_jax(args)
    out["peers"] = peers

    print(
        "\n| impl | keep | img/s/chip | step s | GFLOP/img (analytic / XLA) | MFU | peak GiB | vs eager "
        "| vs compile | end-to-end img/s/chip |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["runs"]:
        ratios = []
        for impl in ("torch-eager", "torch-compile"):
            peer = next((p for p in peers if p.get("impl") == impl and p.get("keep") == r["keep"]), None)
            ok = peer and "img_s" in peer
            ratios.append(f"{r['img_s_per_chip'] / peer['img_s']:.2f}x" if ok else "-")
        print(
            f"| jax | {r['keep']} | {r['img_s_per_chip']} | {r['step_s']} | {r['gflop_per_img']} / "
            f"{r['xla_gflop_per_img']} | {r['mfu']:.1%} | {r['peak_gb']} | {ratios[0]} | {ratios[1]} | "
            f"{round(r['e2e_img_s'] / r['chips'], 1) if 'e2e_img_s' in r else '-'} |"
        )
    for p in peers:
        shown = p.get("img_s", p.get("error"))
        print(
            f"| {p['impl']} | {p['keep']} | {shown} | {p.get('step_s', '-')} | | | "
            f"{p.get('peak_gb', '-')} | | | |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r["finite"] for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

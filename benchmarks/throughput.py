"""Throughput of one full Hybrid Distill training step, beside the PyTorch peer on the same card.

    python benchmarks/throughput.py                       # ViT-B/16 student + 2 ViT-B/16 teachers, 224 px,
                                                          # bf16, batch 256 per chip, keep 0.5 and 1.0, peers
    python benchmarks/throughput.py --quick               # fewer steps, one torch.compile run
    python benchmarks/throughput.py --preset l16 --fsdp -1 --remat_policy dots_saveable --no-peer
                                                          # ViT-L/16 from CLIP-L/14 (196 px) + MAE-L/16
    python benchmarks/throughput.py --cpu-smoke           # tiny models on the CPU: proves the script runs

One step is what the trainer runs (``Trainer._train_step``): both frozen teachers in bf16 on the full
image, redundancy scores, Gumbel-top-k kept tokens, the student (bf16 compute, fp32 params) forward and
backward on CLS + K tokens, feature + relation losses, gradient accumulation (``--accum``), the
non-finite guard and AdamW with clipping; teachers are random-init models exported to a temporary
directory and loaded through ``DistillTask`` like real ones.

Printed per keep ratio: img/s (global and per chip), step time, model FLOPs per image (analytic matmul
count and XLA's cost analysis), MFU against a bf16 matmul peak measured in the same run, peak device
memory, and the ratio to each PyTorch peer (``benchmarks/peer/torch_peer.py``, a copy of
``../shared/bench/torch_peer.py``; run first, in subprocesses, before JAX takes the GPU memory).
Needs jax, flax, optax, numpy (and torch for the peers); not TensorFlow or ml_collections.
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
PEER_DEFAULT = os.path.join(HERE, "peer", "torch_peer.py")

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
    ap.add_argument("--json", default="", help="also write all results to this JSON file")
    a = ap.parse_args(argv)
    a.keeps = [float(k) for k in a.keep.split(",") if k]
    a.peer_compile = [float(k) for k in a.peer_compile_keeps.split(",") if k]
    a.peer_steps = 20
    if a.quick:
        a.steps, a.warmup, a.peer_steps = 5, 2, 10
    if a.cpu_smoke:
        a.preset, a.batch, a.steps, a.warmup, a.matmul, a.peer_run = "tiny", 8, 2, 1, 256, False
    return a


# ---- analytic FLOPs ----------------------------------------------------------------------------------
def vit_forward_flops(arch: dict, image_size: int, tokens: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over ``tokens`` tokens (incl. CLS)."""
    d, depth, mlp, patch = arch["width"], arch["depth"], arch["mlp_dim"], arch["patch_size"]
    embed = 2 * (image_size // patch) ** 2 * patch * patch * 3 * d  # every patch is embedded, then gathered
    per_layer = (
        2 * tokens * (4 * d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    )  # qkv/proj/mlp + attention
    proj = 2 * d * arch.get("proj_dim", 0) if arch.get("proj_dim") else 0
    return embed + depth * per_layer + proj


def step_flops_per_image(task, keep_k: int, relation_on_kept: bool) -> dict:
    from hybrid_distill_jax.models.vit import arch_dict

    s = arch_dict(task.student)
    out = {"student_fwd_bwd": 3 * vit_forward_flops(s, task.image_size, 1 + keep_k)}
    if task.head is not None:
        out["student_fwd_bwd"] += 3 * 2 * (1 + keep_k) * s["width"] * task.feature_width
    for role, t in task.teachers.items():
        n = t.grid**2
        tokens = 1 + (keep_k if role == "relation" and relation_on_kept else n)
        out[f"{role}_teacher_fwd"] = vit_forward_flops(arch_dict(t.model), t.image_size, tokens)
    out["total"] = sum(out.values())
    return out


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


def build_task(args, tmp: str):
    import jax
    import jax.numpy as jnp

    from hybrid_distill_jax.models import io as model_io
    from hybrid_distill_jax.models.vit import make_vit
    from hybrid_distill_jax.tasks.distill import DistillTask

    student, feature, feature_size, relation, image_size = PRESETS[args.preset]
    teachers = {}
    for i, (role, arch, size) in enumerate(
        (("feature", feature, feature_size), ("relation", relation, image_size))
    ):
        model = make_vit({**arch, "image_size": size}, dtype=jnp.bfloat16)  # exported at its own size
        x = jnp.zeros((1, size, size, 3), jnp.float32)
        params = jax.jit(model.init)(jax.random.key(10 + i), x)["params"]
        teachers[role] = dict(
            checkpoint=model_io.save_model(os.path.join(tmp, role), model, params),
            dtype=args.teacher_dtype,
            image_size=size,
            attn_impl=args.teacher_attn_impl,
        )
        del params
    config = as_attr(
        dict(
            image_size=image_size,
            student=dict(
                **student,
                drop_path=args.drop_path,
                dtype=args.student_dtype,
                param_dtype="float32",
                remat=False,
                remat_policy=args.remat_policy,
                mean=model_io.IMAGENET_MEAN,
                std=model_io.IMAGENET_STD,
            ),
            teachers=teachers,
            loss=dict(
                alpha=1.0,
                beta=1.0,
                feature_loss="smooth_l1",
                smooth_l1_beta=2.0,
                whiten_target=True,
                head="linear",
                relation_loss="kl",
                relation_layers=None,
                relation_teacher_on_kept=args.relation_on_kept,
            ),
            masking=dict(
                mode="over_training",
                selection="gumbel",
                temperature=1.0,
                score_source="feature_teacher",
                stage_starts=(0.0,),
                stage_ratios=(0.0,),
                drop_layers=(4, 7, 10),
                drop_ratios=(0.25, 0.4, 0.5),
            ),
            eval=dict(pool="cls"),
        )
    )
    return DistillTask(config)


def make_step(task, tx, mesh, static, accum):
    """The trainer's step (train.Trainer._train_step) without its test-only fault injection."""
    import jax
    import jax.numpy as jnp
    import optax

    from hybrid_distill_jax.parallel import sharding

    def step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        (loss, metrics), grads = sharding.accumulate_gradients(
            lambda p, b, r: grad_fn(p, frozen, b, r, static), state["params"], batch, rng, accum, mesh
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=keep_old(params, state["params"]),
            opt_state=keep_old(opt_state, state["opt_state"]),
        )
        return new_state, dict(metrics, grad_norm=grad_norm)

    return step


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def peak_memory_gb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else None


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hybrid_distill_jax import masking, sharding
    from hybrid_distill_jax.train.optim import make_optimizer

    chips = jax.device_count()
    kind = jax.devices()[0].device_kind
    print(f"# jax {jax.__version__} on {chips} x {kind} ({jax.default_backend()})", flush=True)
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    peak = matmul_peak(args.matmul)
    print(f"# measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s per chip (n={args.matmul})", flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        task = build_task(args, tmp)
    print(f"# teachers exported and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    mesh = sharding.make_mesh({"data": 1 if args.fsdp == -1 else -1, "fsdp": args.fsdp, "model": 1})
    strategy = "fsdp" if mesh.shape["fsdp"] > 1 else "replicated"
    shard_cfg = {"student": strategy, "teachers": strategy, "rules": (), "fsdp_min_size": 2**14}
    global_batch = args.batch * chips
    optim_cfg = as_attr(
        dict(lr=1e-4, base_lr=1.5e-4, min_lr=1e-5, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip=3.0)
    )
    tx, _ = make_optimizer(optim_cfg, global_batch, 10_000, 100)

    def init_state(rng):
        params = task.init_params(rng)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
        }

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    state_sh = sharding.state_shardings(abstract, mesh, shard_cfg)
    frozen_sh = sharding.teacher_shardings(task.frozen, mesh, shard_cfg)
    frozen = jax.device_put(task.frozen, frozen_sh)
    batch_sh = sharding.batch_sharding(mesh)
    size = task.image_size
    images = jax.device_put(
        np.random.RandomState(0).uniform(size=(global_batch, size, size, 3)).astype(np.float32), batch_sh
    )
    batch = {"image": images, "label": jax.device_put(np.zeros((global_batch,), np.int32), batch_sh)}
    n = task.num_patches
    results = []
    for keep in args.keeps:
        k = masking.keep_count(n, 1.0 - keep)
        state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(0))
        step = jax.jit(
            make_step(task, tx, mesh, k, args.accum),
            in_shardings=(state_sh, frozen_sh, batch_sh),
            out_shardings=(state_sh, NamedSharding(mesh, P())),
            donate_argnums=(0,),
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, frozen, batch)
        loss = float(metrics["loss"])  # waits for the last step
        dt = (time.perf_counter() - t0) / args.steps
        analytic = step_flops_per_image(task, k, args.relation_on_kept)
        xla = xla_flops(compiled) if args.accum == 1 else None  # XLA counts a scan body once
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
            )
        )
        print(json.dumps(results[-1]), flush=True)
        del state, compiled, step
    return {"device": kind, "chips": chips, "matmul_peak_tflops": round(peak / 1e12, 1), "runs": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, REPO)
    peers = []
    if args.peer_run:  # before JAX touches the GPU: the peers need its memory
        if not os.path.exists(args.peer):
            print(f"# no peer at {args.peer}: copy ../shared/bench/torch_peer.py there (or --no-peer)")
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
        "| vs compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["runs"]:
        ratios = []
        for impl in ("torch-eager", "torch-compile"):
            peer = next((p for p in peers if p.get("impl") == impl and p.get("keep") == r["keep"]), None)
            ok = peer and "img_s" in peer
            ratios.append(f"{r['img_s_per_chip'] / peer['img_s']:.2f}x" if ok else "-")
        print(
            f"| jax | {r['keep']} | {r['img_s_per_chip']} | {r['step_s']} | {r['gflop_per_img']} / "
            f"{r['xla_gflop_per_img']} | {r['mfu']:.1%} | {r['peak_gb']} | {ratios[0]} | {ratios[1]} |"
        )
    for p in peers:
        shown = p.get("img_s", p.get("error"))
        print(
            f"| {p['impl']} | {p['keep']} | {shown} | {p.get('step_s', '-')} | | | "
            f"{p.get('peak_gb', '-')} | | |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r["finite"] for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

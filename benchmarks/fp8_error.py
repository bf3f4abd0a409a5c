"""What fp8 teachers (``teachers.*.fp8=True``) change, measured on trained teachers: the demo's two.

    make demo                                                 # trains the teachers into runs/demo
    python benchmarks/fp8_error.py --workdir runs/demo        # ~10 min on 2 CPU cores
    python benchmarks/fp8_error.py --workdir runs/demo --seeds 0 --steps 100   # a quick look

For each teacher, bf16 against fp8 on the 2,000 test images:

* per-token cosine of the final tokens (mean and the lowest);
* the relation targets' drift: KL(bf16 target || fp8 target) at the distilled layers, beside the relation
  loss the demo's Hybrid student still has against the bf16 target there (the size of the signal);
* the frozen-feature k-NN top-1 (k=20) of the teacher itself;

then the demo's Hybrid student distilled for ``--steps`` steps from the bf16 and from the fp8 teachers,
per seed, and the paired difference of their k-NN top-1 with its 95% t interval. Prints one table and
writes WORKDIR/fp8_error.json. On a CPU the fp8 products are exact e4m3 arithmetic upcast by XLA, the
same values a GPU's fp8 GEMM computes up to its fp32 accumulation order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo  # noqa: E402
from hybrid_distill_jax import losses  # noqa: E402
from hybrid_distill_jax.data import dataset_info, eval_iterator  # noqa: E402
from hybrid_distill_jax.eval.features import probe_frozen_features  # noqa: E402
from hybrid_distill_jax.experiments.report import paired_interval  # noqa: E402
from hybrid_distill_jax.experiments.stages import run_stage  # noqa: E402
from hybrid_distill_jax.models import io as model_io  # noqa: E402
from hybrid_distill_jax.models.build import normalize, pooled_features  # noqa: E402
from hybrid_distill_jax.models.vit import decode_variant  # noqa: E402
from hybrid_distill_jax.teachers import FrozenTeacher, teacher_config  # noqa: E402
from hybrid_distill_jax.terms.relations import relation_layers  # noqa: E402

# The demo student's teachers (configs/demo.py: teachers.deit, teachers.mae) -> the demo stage training it.
TEACHERS = {"deit": "teacher_supervised", "mae": "teacher_mae"}


def load(checkpoint: str, fp8: bool):
    return FrozenTeacher.load(teacher_config(checkpoint, fp8=fp8), "teacher")


def test_images(config) -> np.ndarray:
    batches = eval_iterator(
        config.data, config.data.eval_split, image_size=config.image_size, batch_size=500, max_examples=2000
    )
    return np.concatenate([b["image"][np.asarray(b["mask"], bool)] for b in batches])


def teacher_error(config, checkpoint: str, images: np.ndarray, layers, student_dir: str) -> dict:
    (bf16, params), (fp8, fp8_params) = load(checkpoint, False), load(checkpoint, True)
    run_bf16, run_fp8 = (jax.jit(lambda p, x, t=t: t(p, x, attn_layers=layers)) for t in (bf16, fp8))
    cos, drift, signal = [], [], []
    student, student_params, meta = model_io.load_model(student_dir, field="student")
    mean, std = meta["input"]["mean"], meta["input"]["std"]
    student_run = jax.jit(
        lambda p, x: student.apply(
            {"params": p}, normalize(x, mean, std, config.image_size), attn_layers=layers
        )
    )
    for start in range(0, len(images), 500):
        x = images[start : start + 500]
        a, b = run_bf16(params, x), run_fp8(fp8_params, x)
        ta, tb = (np.asarray(o["tokens"], np.float32) for o in (a, b))
        cos.append(np.sum(ta * tb, -1) / (np.linalg.norm(ta, axis=-1) * np.linalg.norm(tb, axis=-1)))
        s = student_run(student_params, x)
        drift.append([float(losses.relation_loss(a["attn_logits"][i], b["attn_logits"][i])) for i in layers])
        signal.append([float(losses.relation_loss(a["attn_logits"][i], s["attn_logits"][i])) for i in layers])
    cos = np.concatenate(cos).reshape(-1)
    drift, signal = float(np.mean(drift)), float(np.mean(signal))
    knn = {}
    for name, (teacher, t_params) in (("bf16", (bf16, params)), ("fp8", (fp8, fp8_params))):
        feature_fn = lambda p, x, t=teacher: pooled_features(t(p, x), "cls")  # noqa: E731
        knn[name] = probe_frozen_features(
            config, feature_fn, t_params, dataset_info(config.data).num_classes
        )["knn_top1"]
    return {
        "token_cosine_mean": float(cos.mean()),
        "token_cosine_min": float(cos.min()),
        "relation_kl_drift": drift,
        "student_relation_loss": signal,
        "drift_over_loss": drift / signal,
        "knn_top1_bf16": knn["bf16"],
        "knn_top1_fp8": knn["fp8"],
    }


def distill(config_of, workdir: str, seeds, steps: int) -> dict:
    per = {"bf16": [], "fp8": []}
    for seed in seeds:
        for name in per:
            c = config_of(f"fp8_check_{name}_seed{seed}", steps)
            with c.unlocked():
                c.seed = seed
                c.eval.linear = False
                for teacher, stage in TEACHERS.items():
                    c.teachers[teacher].checkpoint = os.path.join(workdir, stage, "export")
                    c.teachers[teacher].fp8 = name == "fp8"
            per[name].append(run_stage(c, os.path.join(workdir, "fp8_check", c.name))["knn_top1"])
    return {"knn_top1": per, "fp8_minus_bf16": paired_interval(per["fp8"], per["bf16"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="the demo's workdir (make demo)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the short distillations")
    parser.add_argument("--steps", type=int, default=400, help="steps per short distillation (the demo's)")
    args = parser.parse_args(argv)
    config = demo.student("hybrid_student")
    missing = [
        s
        for s in (*TEACHERS.values(), "hybrid_student")
        if not os.path.isfile(os.path.join(args.workdir, s, "export", "model.json"))
    ]
    if missing:
        print(
            f"fp8_error: {args.workdir} lacks the demo's {', '.join(missing)}: run make demo first",
            file=sys.stderr,
        )
        return 2
    images = test_images(config)
    layers = relation_layers(config.terms.relation, decode_variant(config.student.variant)["depth"])
    student_dir = os.path.join(args.workdir, "hybrid_student", "export")
    result = {
        name: teacher_error(config, os.path.join(args.workdir, stage, "export"), images, layers, student_dir)
        for name, stage in TEACHERS.items()
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    result["distill"] = distill(demo.student, args.workdir, seeds, args.steps)
    result.update(
        steps=args.steps, seeds=seeds, layers=list(layers), jax=jax.__version__, backend=jax.default_backend()
    )
    print(
        "| teacher | token cosine mean / min | relation KL drift | student's relation loss | drift / loss "
        "| k-NN bf16 | k-NN fp8 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in TEACHERS:
        r = result[name]
        print(
            f"| {name} ({TEACHERS[name]}) | {r['token_cosine_mean']:.5f} / {r['token_cosine_min']:.4f} | "
            f"{r['relation_kl_drift']:.2e} | {r['student_relation_loss']:.3f} | {r['drift_over_loss']:.2e} | "
            f"{r['knn_top1_bf16']:.2f} | {r['knn_top1_fp8']:.2f} |"
        )
    d = result["distill"]
    iv = d["fp8_minus_bf16"]
    print(
        f"\nstudent k-NN top-1 after {args.steps} steps, seeds {seeds}: "
        f"bf16 teachers {d['knn_top1']['bf16']}, fp8 teachers {d['knn_top1']['fp8']}; "
        f"fp8 - bf16 = {iv['mean']:+.2f} "
        f"(95% CI [{iv['low']:+.2f}, {iv['high']:+.2f}])"
    )
    with open(os.path.join(args.workdir, "fp8_error.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

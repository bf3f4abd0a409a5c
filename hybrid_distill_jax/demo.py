"""The end-to-end demo: train two tiny teachers, distill students from them, evaluate everything.

Each stage lives in its own sub-directory of the workdir. A stage whose export and evaluation already
exist is reused, so a re-run only redoes what is missing.
"""

from __future__ import annotations

import json
import os
import time

import jax

from hybrid_distill_jax import config_lib, evaluate
from hybrid_distill_jax.data import dataset_info
from hybrid_distill_jax.train import build_task, evaluate_features, train


def run_stage(config, workdir: str) -> dict:
    """Trains (or reuses) one stage; returns its evaluation plus its wall time."""
    done_marker = os.path.join(workdir, "eval.json")
    export = os.path.join(workdir, "export", "model.json")
    if os.path.exists(done_marker) and os.path.exists(export):
        print(f"[{config.name}] reusing {workdir}", flush=True)
        with open(done_marker) as f:
            return json.load(f)
    start = time.perf_counter()
    result = train(config, workdir)
    summary = dict(result.summary, train_seconds=time.perf_counter() - start)
    with open(done_marker, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def run_random_init_stage(config, workdir: str) -> dict:
    """The untrained student architecture, exported (for diagnostics and fine-tuning) and evaluated."""
    marker, export = os.path.join(workdir, "eval.json"), os.path.join(workdir, "export")
    if os.path.exists(marker) and os.path.exists(os.path.join(export, "model.json")):
        print(f"[random_init] reusing {workdir}", flush=True)
        with open(marker) as f:
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    info = dataset_info(config.data)
    task = build_task(config, info.num_classes)
    params = task.init_params(jax.random.key(config.seed))
    task.export(params, export)
    summary = dict(evaluate_features(config, task.feature_fn, params, info.num_classes), train_seconds=0.0)
    with open(marker, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def run_demo(config, workdir: str) -> dict:
    workdir = config_lib.check_workdir(workdir)
    for key in ("teacher_supervised", "teacher_mae", *config.students):
        config_lib.validate(config[key], check_teachers=False)
    start = time.perf_counter()
    results = {}
    teachers = {}
    for key in ("teacher_supervised", "teacher_mae"):
        sub = config[key]
        stage_dir = os.path.join(workdir, sub.name)
        results[sub.name] = run_stage(sub, stage_dir)
        teachers[key] = os.path.join(stage_dir, "export")
    for key in config.students:
        sub = config[key]
        with sub.unlocked():
            sub.teachers.feature.checkpoint = teachers["teacher_supervised"]
            sub.teachers.relation.checkpoint = teachers["teacher_mae"]
        results[sub.name] = run_stage(sub, os.path.join(workdir, sub.name))
    baseline = config[config.students[0]]
    results["random_init_student"] = run_random_init_stage(baseline, os.path.join(workdir, "random_init"))

    summary = {name: {k: round(float(v), 3) for k, v in r.items()} for name, r in results.items()}
    total = time.perf_counter() - start
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = {
        name: {k: v for k, v in r.items() if k in ("knn_top1", "linear_top1", "train_seconds")}
        for name, r in summary.items()
    }
    print("\n" + evaluate.format_table(table))
    print(f"\ndemo finished in {total:.0f} s; summary written to {os.path.join(workdir, 'summary.json')}")
    return summary

"""The end-to-end demo: train two tiny teachers, distill students from them, evaluate everything.

Each stage lives in its own sub-directory of the workdir and is cached (``experiments.stages``), so a
re-run only redoes what is missing.
"""

from __future__ import annotations

import json
import os
import time

from hybrid_distill_jax import config_lib, errors, signals, workdir_lock
from hybrid_distill_jax.experiments.report import format_table
from hybrid_distill_jax.experiments.stages import run_random_init_stage, run_stage


@signals.handling()
def run_demo(config, workdir: str) -> dict:
    workdir = workdir_lock.check_workdir(workdir)
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
            sub.teachers.deit.checkpoint = teachers["teacher_supervised"]
            sub.teachers.mae.checkpoint = teachers["teacher_mae"]
        results[sub.name] = run_stage(sub, os.path.join(workdir, sub.name))
    baseline = config[config.students[0]]
    results["random_init_student"] = run_random_init_stage(baseline, os.path.join(workdir, "random_init"))

    summary = {name: {k: round(float(v), 3) for k, v in r.items()} for name, r in results.items()}
    total = time.perf_counter() - start
    errors.write_atomically(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2).encode())
    table = {
        name: {k: v for k, v in r.items() if k in ("knn_top1", "linear_top1", "train_seconds")}
        for name, r in summary.items()
    }
    print("\n" + format_table(table))
    print(f"\ndemo finished in {total:.0f} s; summary written to {os.path.join(workdir, 'summary.json')}")
    return summary

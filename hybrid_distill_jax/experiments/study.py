"""The small-scale reproduction (``mode='study'``, ``configs/study.py``): teachers, five students, three
evaluations each, attention diagnostics, and a generated ``RESULTS.md``.

Stages are cached (``experiments.stages``): a stage whose export and eval.json exist is not rerun.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

from hybrid_distill_jax import config_lib
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.experiments.report import (
    LABELS,
    TEACHERS,
    format_table,
    machine_info,
    make_figures,
    write_report,
)
from hybrid_distill_jax.experiments.stages import run_random_init_stage, run_stage
from hybrid_distill_jax.train.metrics import read_metrics

# ------------------------------------------------------------------------------------------- stages


def _shared(config, sub):
    """A stage's config with the study-wide data, resolution and architecture applied."""
    sub = sub.copy_and_resolve_references()
    with sub.unlocked():
        sub.data = config.data.copy_and_resolve_references()
        sub.image_size = config.image_size
        arch = sub.student if sub.mode == "distill" else sub.model
        arch.variant = config.variant
    return sub


def _throughput(workdir: str) -> float | None:
    """Median training images/s over the run's reports, the first (compilation) excluded."""
    rates = [r["img_per_s"] for r in read_metrics(workdir) if "img_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else None


def _diagnostics(config, workdir: str, exports: dict[str, str]) -> dict:
    path = os.path.join(workdir, "diagnostics.json")
    cached = {}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
    dcfg = config.diagnostics
    results = {}
    for name, directory in exports.items():
        if name in cached and cached[name].get("num_images") == dcfg.num_images:
            results[name] = cached[name]
            continue
        start = time.perf_counter()
        results[name] = diagnostics.diagnose_model_dir(
            directory,
            config.data,
            num_images=dcfg.num_images,
            batch_size=dcfg.batch_size,
            image_size=config.image_size,
        )
        print(f"[diagnostics] {name}: {time.perf_counter() - start:.1f} s", flush=True)
    diagnostics.save(results, path)
    return results


def run_study(config, workdir: str) -> dict:
    workdir = config_lib.check_workdir(workdir)
    start = time.perf_counter()
    stages = {key: _shared(config, config[key]) for key in (*TEACHERS, *config.students)}
    for sub in stages.values():
        config_lib.validate(sub, check_teachers=False)
    unknown = set(config.finetune_models) - set(stages) - {"random_init"}
    if unknown:
        raise ConfigError(f"finetune_models: unknown model(s) {sorted(unknown)}")

    results, exports, dirs = {}, {}, {}
    for key in (*TEACHERS, *config.students):
        sub = stages[key]
        if sub.mode == "distill":
            with sub.unlocked():
                sub.teachers.feature.checkpoint = exports["teacher_supervised"]
                sub.teachers.relation.checkpoint = exports["teacher_mae"]
        dirs[key] = os.path.join(workdir, key)
        results[key] = dict(run_stage(sub, dirs[key]))
        exports[key] = os.path.join(dirs[key], "export")
    baseline = stages[config.students[0]]
    dirs["random_init"] = os.path.join(workdir, "random_init")
    results["random_init"] = run_random_init_stage(baseline, dirs["random_init"])
    exports["random_init"] = os.path.join(dirs["random_init"], "export")

    for key in config.finetune_models:
        ft = _shared(config, config.finetune)
        with ft.unlocked():
            ft.name = f"finetune_{key}"
            ft.init_from = exports[key]
            ft.data.crop_scale = tuple(config.get("finetune_crop_scale", ft.data.crop_scale))
        r = run_stage(ft, os.path.join(workdir, ft.name))
        results[key]["finetune_top1"] = r["finetune_top1"]
        results[key]["finetune_seconds"] = r["train_seconds"]

    diag = _diagnostics(config, workdir, exports)
    total = time.perf_counter() - start
    for key, r in results.items():
        r["pretrain_seconds"] = max(r.get("train_seconds", 0.0) - r.get("eval_seconds", 0.0), 0.0)
        r["img_per_s"] = _throughput(dirs[key]) if key != "random_init" else None
        s = diagnostics.summary_scalars(diag[key])
        layers = diag[key]["layers"]
        r["distance_mean"] = s["distance/mean"]
        r["nmi_mean"] = s["nmi/mean"]
        r["nmi_last"] = s[f"nmi/layer{layers[-1]}"]
        r["distance_last"] = s[f"distance/layer{layers[-1]}"]
        r["distance_head_std"] = float(np.mean([s[f"distance_head_std/layer{la}"] for la in layers]))
    stage_seconds = sum(
        r.get("train_seconds", 0.0) + r.get("finetune_seconds", 0.0) for r in results.values()
    )
    summary = {
        "models": results,
        "wall_seconds": total,
        "stage_seconds": stage_seconds,
        "machine": machine_info(),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    report_dir = config.report_dir or workdir
    figures = make_figures(results, diag, os.path.join(report_dir, "results"), list(config.students))
    report = write_report(
        config, stages, results, figures, (total, stage_seconds), os.path.join(report_dir, "RESULTS.md")
    )
    table = {
        LABELS.get(k, k): {
            m: r.get(m) for m in ("knn_top1", "linear_top1", "finetune_top1", "pretrain_seconds")
        }
        for k, r in results.items()
    }
    print("\n" + format_table(table))
    print(f"\nstudy finished in {total:.0f} s; {report} and {os.path.join(workdir, 'summary.json')} written")
    return summary

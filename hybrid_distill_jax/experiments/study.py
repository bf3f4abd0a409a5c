"""The small-scale reproduction (``mode='study'``, ``configs/study.py``): two teachers trained once, five
students, the untrained student and a fine-tune of every model repeated for ``config.seeds`` seeds,
attention diagnostics, a timing of masking where the student dominates the step, and ``RESULTS.md`` with
mean ± sd tables and paired 95% intervals per claim (``experiments.report``).

Stages are cached (``experiments.stages``): a stage whose export and eval.json exist is not rerun. Stage
directories: ``WORKDIR/<teacher>``, ``WORKDIR/<model>_seed<k>``, ``WORKDIR/finetune_<model>_seed<k>``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import numpy as np

from hybrid_distill_jax import config_lib, errors, masking, signals, workdir_lock
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.experiments import report
from hybrid_distill_jax.experiments.stages import run_random_init_stage, run_stage
from hybrid_distill_jax.models.vit import decode_variant
from hybrid_distill_jax.train import train
from hybrid_distill_jax.train.metrics import read_metrics

# ------------------------------------------------------------------------------------------- stages


def _shared(config, sub, seed: int | None = None):
    """A stage's config with the study-wide data, resolution and architecture (and ``seed``) applied."""
    sub = sub.copy_and_resolve_references()
    with sub.unlocked():
        sub.data = config.data.copy_and_resolve_references()
        sub.image_size = config.image_size
        arch = sub.student if sub.mode == "distill" else sub.model
        arch.variant = config.variant
        if seed is not None:
            sub.seed = seed
    return sub


def _throughput(workdir: str) -> float | None:
    """Median training images/s over the run's reports, the first (compilation) excluded."""
    rates = [r["img_per_s"] for r in read_metrics(workdir) if "img_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else None


def _diagnostics(config, workdir: str, exports: dict[str, str]) -> dict:
    """Diagnostics of every export ({stage directory name: export}), cached in diagnostics.json."""
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
        diagnostics.save({**cached, **results}, path)
    return results


def _masking_cost(config, workdir: str) -> dict | None:
    """Images/s of the Hybrid student's whole training step with and without masking, paired over rounds.

    Run at ``masking_cost.image_size`` (more tokens than the study, so the step's compute is the models'
    and not fixed overheads) with untrained teachers of the study architecture (the cost does not depend
    on the weights); each round trains both settings for ``steps`` steps and takes the median img/s of
    the reports after the first (compilation). Cached in ``masking_cost.json``.
    """
    cc = config.masking_cost
    if cc.rounds == 0:
        return None
    path = os.path.join(workdir, "masking_cost.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if len(cached["rounds"]) == cc.rounds and cached["image_size"] == cc.image_size:
            return cached
    scratch = os.path.join(workdir, "masking_cost")
    shutil.rmtree(scratch, ignore_errors=True)
    teacher = _shared(config, config.teacher_supervised)
    with teacher.unlocked():
        teacher.image_size = cc.image_size
        teacher.eval.knn = teacher.eval.linear = False
    run_random_init_stage(teacher, os.path.join(scratch, "teacher"))
    export = os.path.join(scratch, "teacher", "export")
    tokens = (cc.image_size // decode_variant(config.variant)["patch_size"]) ** 2
    start = time.perf_counter()
    rounds = []
    for r in range(cc.rounds):
        rates = {}
        for setting, ratio in (("unmasked", 0.0), ("masked", cc.mask_ratio)):
            sub = _shared(config, config.hybrid_progressive)
            with sub.unlocked():
                sub.name = f"masking_cost_{setting}"
                sub.image_size = cc.image_size
                sub.batch_size, sub.total_steps, sub.log_every = cc.batch_size, cc.steps, cc.log_every
                sub.optim.warmup_steps = 1
                sub.masking.update(dict(stage_starts=(0.0,), stage_ratios=(ratio,)))
                sub.teachers.deit.checkpoint = sub.teachers.mae.checkpoint = export
                sub.eval.knn = sub.eval.linear = False
                sub.eval.diagnostics_every = 0
            run_dir = os.path.join(scratch, f"round{r}_{setting}")
            train(sub, run_dir)
            rates[setting] = _throughput(run_dir)
        rounds.append(rates)
        print(f"[masking cost] round {r}: {rates}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "image_size": cc.image_size,
        "tokens": tokens,
        "kept_tokens": masking.keep_count(tokens, cc.mask_ratio),
        "mask_ratio": cc.mask_ratio,
        "batch_size": cc.batch_size,
        "steps": cc.steps,
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
    }
    errors.write_atomically(path, json.dumps(result, indent=2).encode())
    return result


def _row(result: dict, diag: dict, workdir: str | None) -> dict:
    """One model at one seed: its evaluation, throughput and the diagnostics' scalars and per-layer means."""
    row = dict(result)
    row["pretrain_seconds"] = max(row.get("train_seconds", 0.0) - row.get("eval_seconds", 0.0), 0.0)
    row["img_per_s"] = _throughput(workdir) if workdir else None
    s = diagnostics.summary_scalars(diag)
    layers = list(diag["layers"])
    row.update(
        layers=layers,
        distance_layers=np.asarray(diag["distance"]).mean(axis=1).tolist(),
        nmi_layers=np.asarray(diag["nmi"]).mean(axis=1).tolist(),
        distance_mean=s["distance/mean"],
        nmi_mean=s["nmi/mean"],
        nmi_last=s[f"nmi/layer{layers[-1]}"],
        distance_last=s[f"distance/layer{layers[-1]}"],
        distance_head_std=float(np.mean([s[f"distance_head_std/layer{la}"] for la in layers])),
    )
    return row


def _check_study(config) -> None:
    """The study-level fields (the stages are checked by ``config_lib.validate``)."""
    cc = config.masking_cost
    patch = decode_variant(config.variant)["patch_size"]
    checks = (
        ("seeds", config.seeds, isinstance(config.seeds, int) and config.seeds >= 1, "an int >= 1"),
        ("masking_cost.rounds", cc.rounds, isinstance(cc.rounds, int) and cc.rounds >= 0, "an int >= 0"),
        ("masking_cost.mask_ratio", cc.mask_ratio, 0.0 < cc.mask_ratio < 1.0, "in (0, 1)"),
        ("masking_cost.image_size", cc.image_size, cc.image_size % patch == 0, f"a multiple of {patch}"),
        ("masking_cost.steps", cc.steps, cc.steps >= 2 * cc.log_every >= 2, "at least 2 x log_every"),
    )
    for field, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{field}: expected {expected}, got {value!r}")


@signals.handling()
def run_study(config, workdir: str) -> dict:
    workdir = workdir_lock.check_workdir(workdir)
    _check_study(config)
    start = time.perf_counter()
    teachers, students = report.TEACHERS, tuple(config.students)
    stages = {key: _shared(config, config[key]) for key in (*teachers, *students)}
    for sub in stages.values():
        config_lib.validate(sub, check_teachers=False)
    unknown = set(config.finetune_models) - set(stages) - {"random_init"}
    if unknown:
        raise ConfigError(f"finetune_models: unknown model(s) {sorted(unknown)}")

    # name -> (evaluation, stage directory); teachers once, the rest per seed as f"{key}_seed{seed}".
    runs, exports = {}, {}

    def run(name: str, sub, runner=run_stage) -> None:
        directory = os.path.join(workdir, name)
        runs[name] = (runner(sub, directory), directory)
        exports[name] = os.path.join(directory, "export")

    def stage_name(key: str, seed: int) -> str:
        return key if key in teachers else f"{key}_seed{seed}"

    def student(key: str, seed: int):
        sub = _shared(config, config[key], seed)
        with sub.unlocked():
            sub.teachers.deit.checkpoint = exports["teacher_supervised"]
            sub.teachers.mae.checkpoint = exports["teacher_mae"]
        return sub

    for key in teachers:
        run(key, stages[key])
    for seed in range(config.seeds):
        for key in students:
            run(stage_name(key, seed), student(key, seed))
        run(stage_name("random_init", seed), student(students[0], seed), run_random_init_stage)
        for key in config.finetune_models:
            ft = _shared(config, config.finetune, seed)
            with ft.unlocked():
                ft.name = f"finetune_{key}_seed{seed}"
                ft.init_from = exports[stage_name(key, seed)]
                ft.data.crop_scale = tuple(config.get("finetune_crop_scale", ft.data.crop_scale))
            run(ft.name, ft)
    cost = _masking_cost(config, workdir)

    pretrained = {n: e for n, e in exports.items() if not n.startswith("finetune_")}
    diag = _diagnostics(config, workdir, pretrained)
    per_seed = {}
    for key in (*teachers, *students, "random_init"):
        per_seed[key] = []
        for seed in range(config.seeds):
            name = stage_name(key, seed)
            result, directory = runs[name]
            row = _row(result, diag[name], directory if key != "random_init" else None)
            row["seed"] = seed
            if key in config.finetune_models:
                ft_result = runs[f"finetune_{key}_seed{seed}"][0]
                row.update(
                    finetune_top1=ft_result["finetune_top1"], finetune_seconds=ft_result["train_seconds"]
                )
            per_seed[key].append(row)
    claim_list = report.claims(per_seed, cost)
    total = time.perf_counter() - start
    stage_seconds = sum(r.get("train_seconds", 0.0) for r, _ in runs.values()) + (cost or {}).get(
        "seconds", 0.0
    )
    summary = {
        "seeds": config.seeds,
        "models": per_seed,
        "claims": claim_list,
        "masking_cost": cost,
        "wall_seconds": total,
        "stage_seconds": stage_seconds,
        "machine": report.machine_info(),
    }
    errors.write_atomically(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2).encode())

    report_dir = config.report_dir or workdir
    bounds = report.distance_bounds(config.image_size, config.variant)
    figures = report.make_figures(per_seed, os.path.join(report_dir, "results"), bounds)
    path = report.write_report(
        config,
        stages,
        per_seed,
        claim_list,
        figures,
        (total, stage_seconds),
        bounds,
        os.path.join(report_dir, "RESULTS.md"),
    )
    table = {}
    for key, rows in per_seed.items():
        table[report.LABELS.get(key, key)] = {
            m: report.mean_sd(values)[0]
            for m in ("knn_top1", "linear_top1", "finetune_top1")
            if None not in (values := [r.get(m) for r in rows])
        }
    print("\n" + report.format_table(table))
    for c in claim_list:
        print("-", report.render_claim(c))
    print(f"\nstudy finished in {total:.0f} s; {path} and {os.path.join(workdir, 'summary.json')} written")
    return summary

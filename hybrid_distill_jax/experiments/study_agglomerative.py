"""Two features of the agglomerative-model recipes at the study's scale (``mode='study_agglomerative'``,
``configs/study.py:agglomerative``): the study's Hybrid student as it is, the same with PHI-S instead of
``whiten`` for the feature term's targets, and the same with a student EMA whose weights are evaluated.

The teachers are trained once and every student is repeated for ``config.seeds`` seeds; the stages are the
study's (``experiments.stages``: cached, named alike), so in a main study's workdir the teachers and the
Hybrid students are reused, not retrained. Each model gets k-NN and a linear probe on frozen features; the
configured ``differences`` (A - B, paired by seed; ``students[0]`` is the reference) get a 95% Student-t
interval and the study's verdict (``report.verdict``: A measurably better holds, measurably worse is
contradicted). A student with an EMA (``ema.decay`` > 0) is two rows: KEY, its EMA weights, and
KEY_online, its online weights (the same run's ``eval.json``). The run writes
WORKDIR/agglomerative.json and the section ``config.section`` of ``report_dir``/RESULTS.md
(``report.write_section``; the study's report keeps it when it rewrites the file).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from hybrid_distill_jax import config_lib, errors, signals, workdir_lock
from hybrid_distill_jax.data import dataset_info
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.experiments import report
from hybrid_distill_jax.experiments.stages import run_stage
from hybrid_distill_jax.experiments.study import _shared

METRICS = (("knn_top1", "k-NN"), ("linear_top1", "linear probe"))
ONLINE = "_online"  # the row of a student-EMA run's online weights


def _has_ema(sub) -> bool:
    return float(sub.get("ema", {}).get("decay", 0.0)) > 0


def _rows(config, stages) -> list[str]:
    """The row keys: teachers, then each student (with an EMA: its EMA weights, then its online ones)."""
    keys = list(report.TEACHERS)
    for key in config.students:
        keys += [key, key + ONLINE] if _has_ema(stages[key]) else [key]
    return keys


def _check(config, stages) -> None:
    if not (isinstance(config.seeds, int) and config.seeds >= 1):
        raise ConfigError(f"seeds: expected an int >= 1, got {config.seeds!r}")
    rows = set(_rows(config, stages))
    for pair in config.differences:
        missing = [k for k in pair if k not in rows]
        if len(pair) != 2 or missing:
            raise ConfigError(
                f"differences: {tuple(pair)!r} must be two of the rows {sorted(rows)} (missing {missing})"
            )


@signals.handling()
def run_agglomerative(config, workdir: str) -> dict:
    workdir = workdir_lock.check_workdir(workdir)
    start = time.perf_counter()
    teachers, students = report.TEACHERS, tuple(config.students)
    stages = {key: _shared(config, config[key]) for key in (*teachers, *students)}
    _check(config, stages)
    for sub in stages.values():
        config_lib.validate(sub, check_teachers=False)

    results, exports = {}, {}

    def run(name: str, sub) -> None:
        directory = os.path.join(workdir, name)
        results[name] = run_stage(sub, directory)
        exports[name] = os.path.join(directory, "export")

    for key in teachers:
        run(key, stages[key])
    for seed in range(config.seeds):
        for key in students:
            sub = _shared(config, config[key], seed)
            with sub.unlocked():
                sub.teachers.deit.checkpoint = exports["teacher_supervised"]
                sub.teachers.mae.checkpoint = exports["teacher_mae"]
            run(f"{key}_seed{seed}", sub)

    # per_seed[row] = one dict per seed: the probes of that row's weights and the stage's seconds.
    per_seed: dict[str, list[dict]] = {}
    for key in (*teachers, *students):
        for seed in range(config.seeds):
            result = results[key if key in teachers else f"{key}_seed{seed}"]
            seconds = result.get("train_seconds", 0.0)
            common = dict(seed=seed, stage_seconds=seconds)
            if _has_ema(stages[key]):
                ema = {m: result[f"ema_{m}"] for m, _ in METRICS}
                per_seed.setdefault(key, []).append(dict(common, **ema))
                online = {m: result[m] for m, _ in METRICS}
                per_seed.setdefault(key + ONLINE, []).append(dict(common, **online))
            else:
                per_seed.setdefault(key, []).append(dict(common, **{m: result[m] for m, _ in METRICS}))

    # An EMA run whose online weights did not train exactly like the reference: its EMA is also compared
    # with its own online weights (the same trajectory), not only with the reference.
    pairs = [tuple(p) for p in config.differences]
    pairs += [(k, k + ONLINE) for k, gap in online_gaps(config, stages, per_seed).items() if gap > 0]
    differences = []
    for a, b in dict.fromkeys(pairs):
        tests = []
        for metric, measure in METRICS:
            iv = report.compare(per_seed, (a, metric), (b, metric))
            tests.append(dict(measure=measure, digits=1, **iv))
        differences.append(dict(a=a, b=b, claim=f"{_label(a)} - {_label(b)}", tests=tests))

    total = time.perf_counter() - start
    stage_seconds = sum(r.get("train_seconds", 0.0) for r in results.values())
    summary = {
        "seeds": config.seeds,
        "models": per_seed,
        "differences": differences,
        "wall_seconds": total,
        "stage_seconds": stage_seconds,
        "machine": report.machine_info(),
    }
    summary["study_shares_stages"] = _study_shares_stages(workdir, per_seed)
    errors.write_atomically(
        os.path.join(workdir, "agglomerative.json"), json.dumps(summary, indent=2).encode()
    )

    path = os.path.join(config.report_dir or workdir, "RESULTS.md")
    report.write_section(path, config.section, section(config, stages, summary))
    table = {
        _label(k): {m: report.mean_sd([r[m] for r in rows])[0] for m, _ in METRICS}
        for k, rows in per_seed.items()
    }
    print("\n" + report.format_table(table))
    for d in differences:
        print("-", report.render_claim(d))
    print(
        f"\nfinished in {total:.0f} s; {path} (section {config.section!r}) and "
        f"{os.path.join(workdir, 'agglomerative.json')} written"
    )
    return summary


def _study_shares_stages(workdir: str, per_seed) -> bool:
    """Whether the study's summary in the same workdir (``study.run_study``) holds exactly this run's
    probes of the models both have: then the study's report and this section read the same stages."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        study = json.load(f)["models"]
    shared = [k for k in per_seed if k in study]
    return bool(shared) and all(
        len(study[k]) == len(per_seed[k])
        and all(a[m] == b[m] for a, b in zip(study[k], per_seed[k]) for m, _ in METRICS)
        for k in shared
    )


def _label(key: str) -> str:
    return report.LABELS.get(key, key)


def _describe(sub) -> tuple[str, str]:
    """A student's feature-target normalisation and student EMA, as the report's Models table gives them."""
    feature = sub.terms.feature
    norm = feature.target_norm
    if norm == "phi_s":
        norm = f"phi_s (statistics from the first {feature.phi_s_batches} batches)"
    ema = (
        f"decay {sub.ema.decay:g}, warm-up {sub.ema.warmup_steps} steps, export {sub.ema.export}"
        if _has_ema(sub)
        else "none"
    )
    return norm, ema


def online_gaps(config, stages, per_seed) -> dict[str, float]:
    """For each student-EMA run, the largest gap (points, over seeds and probes) between its online
    weights' probes and the reference student's (``students[0]``, without an EMA): 0 when keeping the EMA
    left training unchanged."""
    ref = config.students[0]
    if _has_ema(stages[ref]):
        return {}
    return {
        key: max(abs(a[m] - b[m]) for a, b in zip(per_seed[key + ONLINE], per_seed[ref]) for m, _ in METRICS)
        for key in config.students
        if _has_ema(stages[key])
    }


def _online_check(config, stages, per_seed) -> list[str]:
    ref = _label(config.students[0])
    out = []
    for key, gap in online_gaps(config, stages, per_seed).items():
        if gap == 0:
            out.append(
                f"{_label(key + ONLINE)} gives exactly the probes of {ref} at every seed: keeping the EMA "
                "left training unchanged, so the EMA weights are compared with the very online weights they "
                "average."
            )
        else:
            out.append(
                f"{_label(key + ONLINE)} differs from {ref} (largest gap {gap:.2f} points over seeds and "
                "probes): the difference of the EMA weights to the same run's online weights is added below."
            )
    return out


def section(config, stages, summary) -> list[str]:
    """The Markdown of the section: command, machine, time, models, the table and the differences."""
    m = summary["machine"]
    seeds = config.seeds
    command = "python -m hybrid_distill_jax.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if "--config" not in command:
        command = (
            "python -m hybrid_distill_jax.main --config configs/study.py:agglomerative --workdir runs/study"
        )
    any_student = stages[config.students[0]]
    test_n = min(
        any_student.eval.max_test, dataset_info(config.data).num_examples.get(config.data.eval_split, 0)
    )
    lines = [
        "## Agglomerative-model features at this scale: PHI-S targets and student EMA",
        "",
        "Generated by `hybrid_distill_jax/experiments/study_agglomerative.py` from one run with "
        f"{seeds} seed(s) (the rest of this file is the study's report, which keeps this section when it "
        "is rewritten):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), {m['devices']}, JAX {m['jax']}; "
        f"{m['date_utc']} UTC (1-minute load average {m['load_avg_1m']} at the end). Time: the stages "
        f"took **{summary['stage_seconds'] / 60:.1f} min** in the runs that trained them (frozen-feature "
        f"evaluation included); this invocation took {summary['wall_seconds'] / 60:.1f} min (finished "
        "stages, e.g. the study's teachers and Hybrid students in the same workdir, are reused).",
        "",
        (
            "The teachers and the Hybrid students are the same stages as the study's report above reads."
            if summary["study_shares_stages"]
            else "The teachers and the Hybrid students here are this run's stages, not the ones the study's "
            "report above was made from (no study summary with the same probes in this workdir): the same "
            "recipes retrained, so their numbers may differ slightly from the rows above."
        ),
        "",
        f"Data, architecture, teachers and evaluation as in the study above (`{config.data.name}`, "
        f"{config.image_size} px, ViT `{config.variant}`, k-NN and a linear probe on frozen features of up "
        f"to {any_student.eval.max_train} train images, evaluated on {test_n}). Every student is the study's "
        "Hybrid student (feature and relation terms, progressive redundant masking, "
        f"{any_student.total_steps} x {any_student.batch_size}) with one change:",
        "",
        "| model | feature-target normalisation | student EMA |",
        "| --- | --- | --- |",
    ]
    for key in config.students:
        norm, ema = _describe(stages[key])
        lines.append(f"| {_label(key)} | {norm} | {ema} |")
    lines += [
        "",
        "A student-EMA run is evaluated twice: its EMA weights (what its export holds) and its online "
        "weights. " + " ".join(_online_check(config, stages, summary["models"])),
        "",
        "| model | k-NN top-1 | linear top-1 | stage s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, rows in summary["models"].items():
        cells = [
            report._cell(rows, "knn_top1", 1),
            report._cell(rows, "linear_top1", 1),
            report._cell(rows, "stage_seconds", 0),
        ]
        lines.append(f"| {_label(key)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± sample sd over seeds (teachers: one run). Stage seconds: training with compilation and "
        "frozen-feature evaluation (twice for the EMA run).",
        "",
        f"Paired differences A - B across the {seeds} seeds, two-sided {report.LEVEL:.0%} Student-t "
        "interval; the verdict is the study's rule for the claim that A is better than B (**holds**: the "
        "interval lies above 0; **contradicted**: below 0; **not resolved**: it covers 0).",
        "",
        *[f"- {report.render_claim(d)}" for d in summary["differences"]],
        "",
    ]
    return lines

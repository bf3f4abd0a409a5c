"""Reports of the experiments: the plain-text results table, the study's figures and RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from collections.abc import Mapping

import jax
import numpy as np

from hybrid_distill_jax.data import dataset_info
from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.experiments import plots
from hybrid_distill_jax.models.vit import decode_variant

TEACHERS = ("teacher_supervised", "teacher_mae")
LABELS = {
    "teacher_supervised": "supervised teacher",
    "teacher_mae": "MAE teacher",
    "fd_only": "FD-only student",
    "relation_only": "relation-only student",
    "hybrid_nomask": "Hybrid, no masking",
    "hybrid_random": "Hybrid, progressive random masking",
    "hybrid_progressive": "Hybrid, progressive redundant masking",
    "random_init": "untrained student",
}


def format_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """Plain-text table: one row per model, one column per metric (first-seen order), '-' if missing."""
    metrics: list[str] = []
    for row in summary.values():
        metrics.extend(m for m in row if m not in metrics)
    header = ["model", *metrics]
    rows = [[str(name), *(_fmt(vals.get(m)) for m in metrics)] for name, vals in summary.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _fmt(value) -> str:
    return "-" if value is None else f"{float(value):.1f}"


def machine_info() -> dict:
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": f"{len(devices)} x {devices[0].device_kind}" if devices else "none",
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def make_figures(results, diag, out_dir: str, students: list[str]) -> dict[str, str]:
    order = [k for k in (*TEACHERS, *students, "random_init") if k in diag]
    focus = [k for k in ("teacher_supervised", "teacher_mae", "fd_only", "hybrid_progressive") if k in diag]
    named = lambda keys: {LABELS.get(k, k): diag[k] for k in keys}  # noqa: E731
    figs = {
        "distance_focus": plots.plot_distance(
            named(focus),
            os.path.join(out_dir, "attention_distance_teachers_vs_students.png"),
            "Average attention distance: teachers (left) vs FD-only and Hybrid students",
        ),
        "distance_all": plots.plot_distance(
            named(order), os.path.join(out_dir, "attention_distance_all.png")
        ),
        "nmi_focus": plots.plot_nmi(named(focus), os.path.join(out_dir, "nmi_teachers_vs_students.png")),
        "nmi_all": plots.plot_nmi(named(order), os.path.join(out_dir, "nmi_all.png")),
    }
    table = {
        LABELS.get(k, k): {m: results[k].get(m) for m in ("knn_top1", "linear_top1", "finetune_top1")}
        for k in order
    }
    table = {n: {m: v for m, v in row.items() if v is not None} for n, row in table.items()}
    figs["accuracy"] = plots.plot_bars(
        table, ("knn_top1", "linear_top1", "finetune_top1"), os.path.join(out_dir, "accuracy.png")
    )
    return figs


def _f(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def _acc_verdict(a, b, noise: float) -> str:
    """'a beats b' for two top-1 values on the same test set, given the one-seed noise band."""
    if a is None or b is None:
        return "not measured"
    if a - b > noise:
        return "**holds**"
    if b - a > noise:
        return "**does not hold** (reversed)"
    return f"**not resolved** (|difference| <= {noise:.1f}, one seed's noise)"


def claims(results: dict, noise: float = 0.0) -> list[str]:
    """The paper's claims, each checked against this run's numbers (one line each).

    Accuracy differences within ``noise`` points count as unresolved; NMI comparisons are plain.
    """
    r = results
    out = []

    def has(*keys):
        return all(k in r for k in keys)

    if has("teacher_supervised", "teacher_mae"):
        sup, mae = r["teacher_supervised"], r["teacher_mae"]
        out.append(
            "MIM attention is more diverse than supervised attention in late layers (last-layer NMI MAE "
            f"{_f(mae['nmi_last'], 3)} vs supervised {_f(sup['nmi_last'], 3)}; head spread of the distance "
            f"{_f(mae['distance_head_std'], 2)} vs {_f(sup['distance_head_std'], 2)} px): "
            f"{_verdict(mae['nmi_last'] > sup['nmi_last'])}."
        )
        out.append(
            "The supervised teacher discriminates better than MAE on frozen features (k-NN "
            f"{_f(sup['knn_top1'])} vs {_f(mae['knn_top1'])}, linear {_f(sup.get('linear_top1'))} vs "
            f"{_f(mae.get('linear_top1'))}): {_acc_verdict(sup['knn_top1'], mae['knn_top1'], noise)}."
        )
    hyb = "hybrid_progressive" if "hybrid_progressive" in r else "hybrid_nomask"
    if has("fd_only", hyb):
        fd, hy = r["fd_only"], r[hyb]
        out.append(
            f"The relation term keeps attention diverse ({LABELS[hyb]} last-layer NMI "
            f"{_f(hy['nmi_last'], 3)}, "
            f"mean {_f(hy['nmi_mean'], 3)} vs FD-only {_f(fd['nmi_last'], 3)}, {_f(fd['nmi_mean'], 3)}): "
            f"{_verdict(hy['nmi_last'] > fd['nmi_last'])}."
        )
        out.append(
            f"Hybrid beats FD-only after fine-tuning ({_f(hy.get('finetune_top1'))} vs "
            f"{_f(fd.get('finetune_top1'))}): "
            f"{_acc_verdict(hy.get('finetune_top1'), fd.get('finetune_top1'), noise)}; "
            f"on k-NN ({_f(hy['knn_top1'])} vs {_f(fd['knn_top1'])}): "
            f"{_acc_verdict(hy['knn_top1'], fd['knn_top1'], noise)}; on the linear probe "
            f"({_f(hy.get('linear_top1'))} vs {_f(fd.get('linear_top1'))}): "
            f"{_acc_verdict(hy.get('linear_top1'), fd.get('linear_top1'), noise)}."
        )
    if has("relation_only", hyb):
        ro, hy = r["relation_only"], r[hyb]
        out.append(
            f"Hybrid discriminates better than relation-only distillation (k-NN {_f(hy['knn_top1'])} vs "
            f"{_f(ro['knn_top1'])}): {_acc_verdict(hy['knn_top1'], ro['knn_top1'], noise)}."
        )
    if has("teacher_supervised", hyb):
        sup, hy = r["teacher_supervised"], r[hyb]
        out.append(
            f"The Hybrid student reaches teacher-level discrimination (k-NN {_f(hy['knn_top1'])} vs the "
            f"supervised teacher's {_f(sup['knn_top1'])}): "
            f"{_verdict(hy['knn_top1'] >= sup['knn_top1'] - noise)} (within {noise:.1f} points counts)."
        )
    if has("hybrid_nomask", "hybrid_progressive"):
        nm, pr = r["hybrid_nomask"], r["hybrid_progressive"]
        speed = (pr["img_per_s"] or 0) / max(nm["img_per_s"] or 1e-9, 1e-9)
        out.append(
            f"Progressive redundant masking cuts the distillation cost ({speed:.2f}x the median images/s of "
            f"no masking; {_f(pr['pretrain_seconds'], 0)} s vs {_f(nm['pretrain_seconds'], 0)} s): "
            f"{_verdict(speed > 1.0)}. It loses no accuracy (fine-tune {_f(pr.get('finetune_top1'))} vs "
            f"{_f(nm.get('finetune_top1'))}, k-NN {_f(pr['knn_top1'])} vs {_f(nm['knn_top1'])}): "
            f"{_verdict(pr['knn_top1'] >= nm['knn_top1'] - noise)} (k-NN within {noise:.1f} points counts)."
        )
    if has("hybrid_random", "hybrid_progressive"):
        ra, pr = r["hybrid_random"], r["hybrid_progressive"]
        out.append(
            f"Redundancy-guided masking beats random masking at the same ratios (k-NN {_f(pr['knn_top1'])} "
            f"vs {_f(ra['knn_top1'])}; fine-tune {_f(pr.get('finetune_top1'))} vs "
            f"{_f(ra.get('finetune_top1'))}): {_acc_verdict(pr['knn_top1'], ra['knn_top1'], noise)} on k-NN."
        )
    return out


def caveats(config, results: dict) -> list[str]:
    patch = decode_variant(config.variant)["patch_size"]
    grid = config.image_size // patch
    uniform = float(diagnostics.patch_distances(grid, patch).mean())
    dists = [r["distance_mean"] for r in results.values()]
    nmis = [r["nmi_mean"] for r in results.values()]
    out = [
        f"Attention distance has little room on a {grid}x{grid} grid: uniform attention gives "
        f"{uniform:.2f} px and attention to oneself 0 px; every model's mean lies in "
        f"[{min(dists):.2f}, {max(dists):.2f}] px, i.e. near uniform. NMI lies in [{min(nmis):.3f}, "
        f"{max(nmis):.3f}] (0 = collapse, 1 = one-to-one), so the diversity differences are real but small.",
    ]
    below = [k for k, r in results.items() if (r.get("finetune_top1") or 0) < (r.get("linear_top1") or 0)]
    if below:
        out.append(
            f"Fine-tuning ({config.finetune.total_steps} steps) ends below the frozen linear probe for "
            f"{len(below)} of {len(results)} models: the recipe is too short for a new head and "
            "layer-decayed full updates to recover (a lower learning rate or more steps would be needed), so "
            "compare the fine-tune column between models, not with the probes."
        )
    return out


def write_report(config, stages, results, figures, times: tuple[float, float], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))  # noqa: E731
    m = machine_info()
    command = "python -m hybrid_distill_jax.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if "--config" not in command:
        command = "python -m hybrid_distill_jax.main --config configs/study.py --workdir runs/study"
    any_stage = next(iter(stages.values()))
    test_n = min(
        any_stage.eval.max_test, dataset_info(config.data).num_examples.get(config.data.eval_split, 0)
    )
    lines = [
        "# Results: a small-scale reproduction of Hybrid Distill's evidence",
        "",
        "Generated by `hybrid_distill_jax/experiments/study.py` from one run; every number below comes "
        "from that run.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), {m['devices']}, {m['platform']}, "
        f"Python {m['python']}, JAX {m['jax']}; {m['date_utc']} UTC. The cores were shared with other jobs "
        f"(1-minute load average {m['load_avg_1m']} when this report was written), so the times below are "
        "pessimistic and noisy.",
        "",
        f"Time: the stages (pre-training with compilation and frozen-feature evaluation, then fine-tuning) "
        f"took **{times[1] / 60:.1f} min** in the run that trained them; this invocation of the command took "
        f"{times[0] / 60:.1f} min (finished stages are reused, not rerun).",
        "",
        f"Data: `{config.data.name}` ({config.data.train_split} / {config.data.eval_split}, evaluation on "
        f"{test_n} images), {config.image_size} px, ViT `{config.variant}` for every model.",
        "",
        "## Models",
        "",
        "| model | objective | steps x batch | masking |",
        "| --- | --- | --- | --- |",
    ]
    for key, sub in stages.items():
        if sub.mode == "distill":
            objective = f"alpha={sub.loss.alpha:g} (feature), beta={sub.loss.beta:g} (relation)"
            ratios = tuple(sub.masking.stage_ratios)
            masking = (
                "none"
                if max(ratios) == 0
                else f"ratios {list(ratios)} from {list(sub.masking.stage_starts)} of training, "
                f"{sub.masking.selection} on {sub.masking.score_source}"
            )
        else:
            objective = {"supervised": "cross-entropy on labels", "mae": "MAE pixel reconstruction (75%)"}[
                sub.mode
            ]
            masking = "–"
        lines.append(
            f"| {LABELS.get(key, key)} | {objective} | {sub.total_steps} x {sub.batch_size} | {masking} |"
        )
    ft = config.finetune
    pools = ", ".join(f"{LABELS.get(k, k)}: {sub.eval.pool}" for k, sub in stages.items())
    lines += [
        "| untrained student | random initialisation | – | – |",
        "",
        f"Fine-tuning (every model, same recipe): {ft.total_steps} steps x {ft.batch_size}, AdamW lr "
        f"{ft.optim.lr:g}, layer decay {ft.finetune.layer_decay:g}, drop path {ft.model.drop_path:g}, mixup "
        f"{ft.finetune.mixup:g}, cutmix {ft.finetune.cutmix:g}, label smoothing {ft.loss.label_smoothing:g}, "
        f"{ft.model.pool} pooling, crops of {list(config.get('finetune_crop_scale', []))} of the area. "
        "k-NN: cosine, "
        f"k={any_stage.eval.knn_k}, T={any_stage.eval.knn_temperature:g}; "
        f"linear probe: MAE protocol (BatchNorm w/o affine + linear), {any_stage.eval.linear_epochs} epochs; "
        f"both on frozen features ({pools}) of up to {any_stage.eval.max_train} train images.",
        "",
        "## Results",
        "",
        "| model | k-NN top-1 | linear top-1 | fine-tune top-1 | pre-train s | img/s | fine-tune s "
        "| mean dist (px) | last-layer dist | head spread (px) | mean NMI | last-layer NMI |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.items():
        lines.append(
            f"| {LABELS.get(key, key)} | {_f(r.get('knn_top1'))} | {_f(r.get('linear_top1'))} | "
            f"{_f(r.get('finetune_top1'))} | {_f(r.get('pretrain_seconds'), 0)} "
            f"| {_f(r.get('img_per_s'), 0)} | "
            f"{_f(r.get('finetune_seconds'), 0)} | "
            f"{_f(r['distance_mean'], 2)} | {_f(r['distance_last'], 2)} | "
            f"{_f(r['distance_head_std'], 2)} | {_f(r['nmi_mean'], 3)} | {_f(r['nmi_last'], 3)} |"
        )
    se = 100 * np.sqrt(0.85 * 0.15 / max(test_n, 1))
    lines += [
        "",
        f"Pre-train seconds exclude the frozen-feature evaluation and include compilation. img/s is the "
        f"median training throughput. Distances are in pixels of the {config.image_size} px input "
        f"(adjacent patches are {decode_variant(config.variant)['patch_size']} px "
        f"apart); head spread = standard deviation over heads, averaged over layers. One seed: with "
        f"{test_n} test images a top-1 near 85% has a standard error of about {se:.1f} points, so "
        f"differences below ~{2 * np.sqrt(2) * se:.1f} points between two models (two standard errors of "
        "the difference) are treated as noise below.",
        "",
        "## The paper's claims at this scale",
        "",
        *[f"- {c}" for c in claims(results, noise=2 * np.sqrt(2) * se)],
        "",
        "## Caveats (computed from this run)",
        "",
        *[f"- {c}" for c in caveats(config, results)],
        "",
        "## Plots",
        "",
        f"![accuracy]({rel(figures['accuracy'])})",
        "",
        f"![attention distance, teachers vs students]({rel(figures['distance_focus'])})",
        "",
        f"![NMI, teachers vs students]({rel(figures['nmi_focus'])})",
        "",
        f"All models: [attention distance]({rel(figures['distance_all'])}), "
        f"[NMI]({rel(figures['nmi_all'])}).",
        "",
        "## Reproducing and extending",
        "",
        "- The whole study: the command above (finished stages are reused; delete a stage's directory to "
        "redo it). Per-stage metrics: `WORKDIR/<stage>/metrics.jsonl` "
        "(students also log `diag/...` attention "
        "diagnostics during training); all numbers: `WORKDIR/summary.json`; diagnostics: "
        "`WORKDIR/diagnostics.json`.",
        "- One model: `python -m hybrid_distill_jax.main --config configs/eval.py --workdir DIR "
        "--config.model_dir=WORKDIR/hybrid_progressive/export` (k-NN, linear probe, diagnostics) and "
        "`--config configs/finetune.py --config.init_from=...` (fine-tuning).",
        "- Diagnostics plots of any exported or converted models: "
        "`python -m hybrid_distill_jax.experiments.analyze --model WORKDIR/teacher_mae/export "
        "--model WORKDIR/hybrid_progressive/export --out OUTDIR`.",
        "- Definitions: attention distance and NMI per `docs/METHOD.md`, per image then averaged "
        "(`hybrid_distill_jax/eval/diagnostics.py`).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path

"""Reports of the experiments: the plain-text results table, the study's statistics, figures and RESULTS.md.

The study's verdict rule: a claim "A beats B" is judged on the paired differences A - B across seeds
(same seed = same data order, initialisation and probe split for both). Their mean gets a two-sided 95%
Student-t interval; the claim **holds** when the interval lies above zero, is **contradicted** when it
lies below zero, and is **not resolved** otherwise, or when there is nothing to form an interval from
(one seed, or differences that do not vary across seeds, e.g. two teachers trained once).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from hybrid_distill_jax import errors
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
    "hybrid_phi_s": "Hybrid, PHI-S feature targets",
    "hybrid_ema": "Hybrid, student EMA (EMA weights)",
    "hybrid_ema_online": "Hybrid, student EMA run (online weights)",
}
LEVEL = 0.95


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


# ----------------------------------------------------------------------------------------- statistics


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (no scipy).

    With t = sqrt(df) tan(u), P(0 < T < t) = c sqrt(df) * integral_0^u cos(v)^(df-1) dv, a smooth integral
    on [0, pi/2) (Simpson's rule), inverted for u by bisection.
    """
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi))
    scale *= math.sqrt(df)

    def half_cdf(u: float) -> float:
        v = np.linspace(0.0, u, 2049)
        f = np.cos(v) ** (df - 1)
        return scale * (u / 2048 / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, math.pi / 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if half_cdf(mid) < p - 0.5 else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """Mean of the paired differences a_i - b_i with its two-sided t interval at ``level``."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean, sd = mean_sd(d)
    n = int(d.size)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.inf
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def verdict(interval: Mapping[str, float]) -> str:
    """'holds' / 'contradicted' / 'not resolved' for the claim that the difference is positive."""
    if interval["n"] < 2 or interval["sd"] == 0.0:
        return "not resolved"
    if interval["low"] > 0:
        return "holds"
    if interval["high"] < 0:
        return "contradicted"
    return "not resolved"


def compare(per_seed: Mapping[str, list[dict]], a: tuple[str, str], b: tuple[str, str]) -> dict | None:
    """The paired interval and verdict of (model, metric) ``a`` minus ``b`` across seeds; None if missing."""
    if a[0] not in per_seed or b[0] not in per_seed:
        return None
    va = [row.get(a[1]) for row in per_seed[a[0]]]
    vb = [row.get(b[1]) for row in per_seed[b[0]]]
    if None in va or None in vb:
        return None
    out = paired_interval(va, vb)
    out.update(a_mean=mean_sd(va)[0], b_mean=mean_sd(vb)[0], verdict=verdict(out))
    return out


def _claim(text: str, *tests: tuple[str, dict | None, int]) -> dict | None:
    tests = [dict(measure=m, digits=d, **iv) for m, iv, d in tests if iv is not None]
    return dict(claim=text, tests=tests) if tests else None


def claims(per_seed: Mapping[str, list[dict]], cost: Mapping | None = None) -> list[dict]:
    """The paper's claims, each a list of paired tests "A beats B" (``compare``) with their verdicts."""
    hyb = "hybrid_progressive" if "hybrid_progressive" in per_seed else "hybrid_nomask"
    sup, mae = "teacher_supervised", "teacher_mae"

    def same(a, b, metric):
        return compare(per_seed, (a, metric), (b, metric))

    out = [
        _claim(
            "MIM attention is more diverse than supervised attention in late layers "
            "(MAE - supervised teacher)",
            ("last-layer NMI", same(mae, sup, "nmi_last"), 3),
            ("head spread of the distance (px)", same(mae, sup, "distance_head_std"), 2),
        ),
        _claim(
            "The supervised teacher discriminates better than MAE on frozen features (supervised - MAE)",
            ("k-NN", same(sup, mae, "knn_top1"), 1),
            ("linear probe", same(sup, mae, "linear_top1"), 1),
        ),
        _claim(
            "Fine-tuning beats the frozen linear probe (the usual ordering; fine-tune - linear, same model)",
            *(
                (LABELS[k], compare(per_seed, (k, "finetune_top1"), (k, "linear_top1")), 1)
                for k in (sup, mae)
            ),
        ),
        _claim(
            f"The relation term keeps attention diverse ({LABELS.get(hyb)} - FD-only student)",
            ("last-layer NMI", same(hyb, "fd_only", "nmi_last"), 3),
            ("mean NMI", same(hyb, "fd_only", "nmi_mean"), 3),
        ),
        _claim(
            "Hybrid beats FD-only distillation (Hybrid - FD-only)",
            ("fine-tune", same(hyb, "fd_only", "finetune_top1"), 1),
            ("k-NN", same(hyb, "fd_only", "knn_top1"), 1),
            ("linear probe", same(hyb, "fd_only", "linear_top1"), 1),
        ),
        _claim(
            "Hybrid discriminates better than relation-only distillation (Hybrid - relation-only)",
            ("k-NN", same(hyb, "relation_only", "knn_top1"), 1),
            ("linear probe", same(hyb, "relation_only", "linear_top1"), 1),
        ),
        _claim(
            "The Hybrid student reaches the supervised teacher's discrimination (Hybrid - teacher; "
            "holds only if the student is measurably better, an interval covering 0 is not resolved)",
            ("k-NN", same(hyb, sup, "knn_top1"), 1),
            ("linear probe", same(hyb, sup, "linear_top1"), 1),
        ),
        _cost_claim(cost),
        _claim(
            "Progressive redundant masking loses no accuracy (masked - unmasked Hybrid; holds only if the "
            "masked student is measurably better, contradicted if measurably worse)",
            ("fine-tune", same("hybrid_progressive", "hybrid_nomask", "finetune_top1"), 1),
            ("k-NN", same("hybrid_progressive", "hybrid_nomask", "knn_top1"), 1),
            ("linear probe", same("hybrid_progressive", "hybrid_nomask", "linear_top1"), 1),
        ),
        _claim(
            "Redundancy-guided masking beats random masking at the same ratios (redundant - random)",
            ("k-NN", same("hybrid_progressive", "hybrid_random", "knn_top1"), 1),
            ("fine-tune", same("hybrid_progressive", "hybrid_random", "finetune_top1"), 1),
            ("linear probe", same("hybrid_progressive", "hybrid_random", "linear_top1"), 1),
        ),
    ]
    return [c for c in out if c is not None]


def _cost_claim(cost: Mapping | None) -> dict | None:
    text = "Progressive redundant masking cuts the distillation cost (images/s masked - unmasked)"
    if not cost or not cost.get("rounds"):
        return dict(claim=text, tests=[], note="not measured at this scale (masking_cost.rounds = 0)")
    masked = [r["masked"] for r in cost["rounds"]]
    unmasked = [r["unmasked"] for r in cost["rounds"]]
    iv = paired_interval(masked, unmasked)
    iv.update(a_mean=mean_sd(masked)[0], b_mean=mean_sd(unmasked)[0], verdict=verdict(iv))
    measure = (
        f"student step at {cost['image_size']} px ({cost['tokens']} tokens, {cost['kept_tokens']} kept at "
        f"mask ratio {cost['mask_ratio']:g}), batch {cost['batch_size']}, paired over {len(masked)} timing "
        f"rounds (mean ratio {iv['a_mean'] / iv['b_mean']:.2f}x), img/s"
    )
    return dict(claim=text, tests=[dict(measure=measure, digits=0, **iv)])


def render_claim(c: Mapping) -> str:
    if not c["tests"]:
        return f"{c['claim']}: **not resolved**, {c['note']}."
    parts = []
    for t in c["tests"]:
        d = t["digits"]
        interval = (
            f"difference {t['mean']:+.{d}f}, 95% CI [{t['low']:+.{d}f}, {t['high']:+.{d}f}]"
            if t["n"] > 1 and t["sd"] > 0
            else f"difference {t['mean']:+.{d}f}, no variation across seeds to form an interval"
        )
        parts.append(
            f"{t['measure']} {t['a_mean']:.{d}f} vs {t['b_mean']:.{d}f} ({interval}): **{t['verdict']}**"
        )
    return f"{c['claim']}: " + "; ".join(parts) + "."


# ------------------------------------------------------------------------------------------- report

TABLE = (  # (row key, column title, digits)
    ("knn_top1", "k-NN top-1", 1),
    ("linear_top1", "linear top-1", 1),
    ("finetune_top1", "fine-tune top-1", 1),
    ("pretrain_seconds", "pre-train s", 0),
    ("img_per_s", "img/s", 0),
    ("finetune_seconds", "fine-tune s", 0),
)
DIAG_TABLE = (
    ("distance_mean", "mean dist (px)", 2),
    ("distance_last", "last-layer dist (px)", 2),
    ("distance_head_std", "head spread (px)", 2),
    ("nmi_mean", "mean NMI", 3),
    ("nmi_last", "last-layer NMI", 3),
)


def _cell(rows: list[dict], key: str, digits: int) -> str:
    values = [r.get(key) for r in rows]
    if None in values:
        return "–"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _table(per_seed, columns) -> list[str]:
    lines = [
        "| model | " + " | ".join(title for _, title, _ in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for key, rows in per_seed.items():
        cells = " | ".join(_cell(rows, k, d) for k, _, d in columns)
        lines.append(f"| {LABELS.get(key, key)} | {cells} |")
    return lines


def distance_bounds(image_size: int, variant: str) -> dict:
    """Mean attention distance (px) of attending to oneself, uniformly, and to the farthest patch only."""
    patch = decode_variant(variant)["patch_size"]
    grid = image_size // patch
    dist = diagnostics.patch_distances(grid, patch)
    return {
        "grid": grid,
        "patch": patch,
        "self": 0.0,
        "uniform": float(dist.mean()),
        "farthest": float(dist.max(axis=1).mean()),
    }


def make_figures(per_seed, out_dir: str, bounds: Mapping[str, float]) -> dict[str, str]:
    """Accuracy bars and per-layer diagnostics, each as the mean over seeds with +-1 sd error bars."""
    names = {LABELS.get(k, k): rows for k, rows in per_seed.items()}

    def layer_series(field):
        out = {}
        for name, rows in names.items():
            values = np.stack([np.asarray(r[field], np.float64) for r in rows])
            sd = values.std(0, ddof=1) if len(rows) > 1 else np.zeros(values.shape[1])
            out[name] = (rows[0]["layers"], values.mean(0), sd)
        return out

    metrics = ("knn_top1", "linear_top1", "finetune_top1")
    table, errors = {}, {}
    for name, rows in names.items():
        table[name], errors[name] = {}, {}
        for m in metrics:
            values = [r.get(m) for r in rows]
            if None not in values:
                table[name][m], errors[name][m] = mean_sd(values)
    return {
        "accuracy": plots.plot_bars(
            table,
            metrics,
            os.path.join(out_dir, "accuracy.png"),
            "Accuracy per model (mean ± sd over seeds)",
            errors=errors,
        ),
        "distance": plots.plot_layers(
            layer_series("distance_layers"),
            os.path.join(out_dir, "attention_distance_per_layer.png"),
            "avg attention distance (px)",
            "Attention distance per layer (head mean; mean ± sd over seeds)\n"
            f"bounds: attention to oneself {bounds['self']:.0f} px, only the farthest patch "
            f"{bounds['farthest']:.1f} px",
            bounds={"uniform attention": bounds["uniform"]},
        ),
        "nmi": plots.plot_layers(
            layer_series("nmi_layers"),
            os.path.join(out_dir, "nmi_per_layer.png"),
            "NMI (query ; key)",
            "NMI per layer (head mean; mean ± sd over seeds; 0 = attention collapse)",
        ),
    }


def caveats(per_seed, bounds: Mapping[str, float], config) -> list[str]:
    dists = [mean_sd([r["distance_mean"] for r in rows])[0] for rows in per_seed.values()]
    out = [
        f"Attention distance on the {bounds['grid']}x{bounds['grid']} grid ({bounds['patch']} px patches): "
        f"attention to oneself gives {bounds['self']:.2f} px, uniform attention {bounds['uniform']:.2f} px, "
        f"attention only to the farthest patch {bounds['farthest']:.2f} px; the models' mean distances lie "
        f"in [{min(dists):.2f}, {max(dists):.2f}] px.",
        "The teachers are trained once: their k-NN, linear-probe and diagnostic numbers are one measurement "
        "(sd 0), and their fine-tunes vary only with the fine-tuning seed. Claims that compare the two "
        "teachers' frozen features therefore have no interval and stay not resolved.",
    ]
    below = []
    for key, rows in per_seed.items():
        finetune, linear = [r.get("finetune_top1") for r in rows], [r.get("linear_top1") for r in rows]
        if None not in finetune and None not in linear and np.mean(finetune) < np.mean(linear):
            below.append(key)
    if below:
        out.append(
            f"Fine-tuning ({config.finetune.total_steps} steps) ends below the frozen linear probe on "
            f"average for {len(below)} of {len(per_seed)} models: "
            + ", ".join(LABELS.get(k, k) for k in below)
            + "."
        )
    return out


def write_report(config, stages, per_seed, claim_list, figures, times, bounds, path: str) -> str:
    """RESULTS.md: models, mean ± sd tables, the claims with paired intervals, caveats and plots."""
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
    seeds = config.seeds
    lines = [
        "# Results: a small-scale reproduction of Hybrid Distill's evidence",
        "",
        f"Generated by `hybrid_distill_jax/experiments/study.py` from one run with {seeds} seed(s); every "
        "number below comes from that run.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), {m['devices']}, {m['platform']}, "
        f"Python {m['python']}, JAX {m['jax']}; {m['date_utc']} UTC (1-minute load average "
        f"{m['load_avg_1m']} when this report was written; other jobs on the cores make times pessimistic).",
        "",
        f"Time: the stages (pre-training with compilation and frozen-feature evaluation, fine-tuning, the "
        f"masking timing) took **{times[1] / 60:.1f} min** in the runs that trained them; this invocation of "
        f"the command took {times[0] / 60:.1f} min (finished stages are reused, not rerun).",
        "",
        f"Data: `{config.data.name}` ({config.data.train_split} / {config.data.eval_split}, evaluation on "
        f"{test_n} images), {config.image_size} px, ViT `{config.variant}` for every model "
        f"({bounds['grid']}x{bounds['grid']} patches of {bounds['patch']} px).",
        "",
        f"Seeds: the two teachers are trained once; every student, the untrained student and every fine-tune "
        f"are repeated for seeds 0..{seeds - 1} (the seed sets initialisation, data order and augmentation). "
        "Tables give mean ± sample standard deviation over seeds.",
        "",
        "## Models",
        "",
        "| model | objective | steps x batch | masking |",
        "| --- | --- | --- | --- |",
    ]
    for key, sub in stages.items():
        if sub.mode == "distill":
            objective = ", ".join(
                f"{name} {term.weight:g} ({term.kind}, teachers.{term.teacher})"
                for name, term in sub.terms.items()
            )
            ratios = tuple(sub.masking.stage_ratios)
            masking = (
                "none"
                if max(ratios) == 0
                else f"ratios {list(ratios)} from {list(sub.masking.stage_starts)} of training, "
                f"{sub.masking.selection} on {sub.masking.score_teacher or 'uniform'} scores"
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
        f"Fine-tuning (one recipe for {', '.join(LABELS.get(k, k) for k in config.finetune_models)}): "
        f"{ft.total_steps} steps x {ft.batch_size}, AdamW lr "
        f"{ft.optim.lr:g} (warm-up {ft.optim.warmup_steps}, cosine to {ft.optim.min_lr:g}), layer decay "
        f"{ft.finetune.layer_decay:g}, drop path {ft.model.drop_path:g}, mixup {ft.finetune.mixup:g}, cutmix "
        f"{ft.finetune.cutmix:g}, label smoothing {ft.loss.label_smoothing:g}, {ft.model.pool} pooling, "
        f"crops of {list(config.get('finetune_crop_scale', []))} of the area. k-NN: cosine, "
        f"k={any_stage.eval.knn_k}, T={any_stage.eval.knn_temperature:g}; "
        f"linear probe: MAE protocol (BatchNorm w/o affine + linear), {any_stage.eval.linear_epochs} epochs; "
        f"both on frozen features ({pools}) of up to {any_stage.eval.max_train} train images.",
        "",
        "## Accuracy and cost (mean ± sd over seeds)",
        "",
        *_table(per_seed, TABLE),
        "",
        "Pre-train seconds exclude the frozen-feature evaluation and include compilation; img/s is the "
        "median training throughput of the stage (a whole step, teachers and input pipeline included).",
        "",
        "## Attention diagnostics (mean ± sd over seeds)",
        "",
        f"Bounds for the mean distance on this grid: **{bounds['self']:.2f} px** (attention to oneself), "
        f"**{bounds['uniform']:.2f} px** (uniform attention), **{bounds['farthest']:.2f} px** (only the "
        "farthest patch).",
        "",
        *_table(per_seed, DIAG_TABLE),
        "",
        "Distances in pixels of the input; head spread = standard deviation over heads, averaged over "
        "layers; NMI between query and key position, 0 = every query attends alike (collapse), "
        "1 = one-to-one.",
        "",
        "## The paper's claims at this scale",
        "",
        f"Rule: each test is a paired difference across the {seeds} seed(s) with a two-sided {LEVEL:.0%} "
        "Student-t interval; a claim **holds** when the interval lies entirely on the claimed side of 0, is "
        "**contradicted** when it lies entirely on the other side, and is **not resolved** otherwise "
        "(including when the difference does not vary across seeds).",
        "",
        *[f"- {render_claim(c)}" for c in claim_list],
        "",
        "## Caveats (computed from this run)",
        "",
        *[f"- {c}" for c in caveats(per_seed, bounds, config)],
        "",
        "## Plots",
        "",
        f"![accuracy]({rel(figures['accuracy'])})",
        "",
        f"![attention distance per layer]({rel(figures['distance'])})",
        "",
        f"![NMI per layer]({rel(figures['nmi'])})",
        "",
        "## Reproducing and extending",
        "",
        "- The whole study: the command above (finished stages are reused; delete a stage's directory to "
        "redo it). Stage directories are `WORKDIR/<model>` for the teachers and `WORKDIR/<model>_seed<k>` "
        "for everything repeated per seed; per-stage metrics: `metrics.jsonl` there (students also log "
        "`diag/...` attention diagnostics during training); all numbers, per seed, and the claims: "
        "`WORKDIR/summary.json`; diagnostics: `WORKDIR/diagnostics.json`; the masking timing: "
        "`WORKDIR/masking_cost.json`.",
        "- One model: `python -m hybrid_distill_jax.main --config configs/eval.py --workdir DIR "
        "--config.model_dir=WORKDIR/hybrid_progressive_seed0/export` (k-NN, linear probe, diagnostics) and "
        "`--config configs/finetune.py --config.init_from=...` (fine-tuning).",
        "- Diagnostics plots of any exported or converted models: "
        "`python -m hybrid_distill_jax.experiments.analyze --model WORKDIR/teacher_mae/export "
        "--model WORKDIR/hybrid_progressive_seed0/export --out OUTDIR`.",
        "- Definitions: attention distance and NMI per `docs/METHOD.md`, per image then averaged "
        "(`hybrid_distill_jax/eval/diagnostics.py`).",
        "",
    ]
    errors.write_atomically(path, keep_sections(path, "\n".join(lines)).encode())
    return path


# ------------------------------------------------------------------------------ generated sections
# A runner other than the study (e.g. ``experiments.study_agglomerative``) owns a section of RESULTS.md
# between these markers: it replaces only its own section, and ``write_report`` keeps every section when
# it rewrites the rest of the file.
SECTION_BEGIN = "<!-- BEGIN generated section: {} -->"
SECTION_END = "<!-- END generated section: {} -->"
_SECTION = re.compile(
    r"<!-- BEGIN generated section: (\S+) -->\n.*?<!-- END generated section: \1 -->\n?", re.S
)


def keep_sections(path: str, text: str) -> str:
    """``text`` followed by every generated section of the file ``path`` (none if it does not exist), so
    that rewriting a report keeps what other runners wrote into it."""
    if not os.path.exists(path):
        return text
    with open(path) as f:
        sections = [m.group(0).rstrip("\n") + "\n" for m in _SECTION.finditer(f.read())]
    if not sections:
        return text
    return text.rstrip("\n") + "\n\n" + "\n".join(sections)


def write_section(path: str, name: str, lines: Sequence[str]) -> str:
    """Writes ``lines`` as the section ``name`` of the Markdown file ``path``: in place of the section's
    previous text, or appended (the file is created if missing); the rest of the file is left as is."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"section name {name!r}: letters, digits, '_', '.' and '-' only")
    block = "\n".join([SECTION_BEGIN.format(name), *lines, SECTION_END.format(name)]) + "\n"
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    begin, end = re.escape(SECTION_BEGIN.format(name)), re.escape(SECTION_END.format(name))
    pattern = re.compile(f"{begin}\n.*?{end}\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block if text.strip() else block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    errors.write_atomically(path, text.encode())
    return path

"""PNG plots of the attention diagnostics (matplotlib, Agg backend: no display needed).

``results`` everywhere is ``{model name: diagnostics.AttentionDiagnostics result}`` in display order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_distance(results: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> str:
    """One panel per model, side by side: each head's average attention distance (px) against its layer."""
    plt = _pyplot()
    names = list(results)
    cols = min(len(names), 4)
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)
    top = max(float(np.max(r["distance"])) for r in results.values())
    bottom = min(float(np.min(r["distance"])) for r in results.values())
    bottom = max(0.0, bottom - 0.08 * (top - bottom))
    for ax, name in zip(axes.flat, names):
        r = results[name]
        dist = np.asarray(r["distance"])  # [L, H]
        layers = np.asarray(r["layers"])
        for h in range(dist.shape[1]):
            ax.scatter(layers, dist[:, h], s=14, alpha=0.75)
        ax.plot(layers, dist.mean(axis=1), color="black", lw=1, label="head mean")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(bottom, top + 0.08 * (top - bottom) + 1e-6)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("avg attention distance (px)")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title or "Average attention distance per head (dots) and layer mean (line)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_nmi(results: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> str:
    """NMI per layer (head mean, lines) for every model on one axis, each head as a faint dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (name, r) in enumerate(results.items()):
        info = np.asarray(r["nmi"])
        layers = np.asarray(r["layers"], np.float64)
        color = f"C{i % 10}"
        ax.plot(layers, info.mean(axis=1), marker="o", color=color, label=name)
        jitter = (i - (len(results) - 1) / 2) * 0.05
        for h in range(info.shape[1]):
            ax.scatter(layers + jitter, info[:, h], s=6, color=color, alpha=0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel("NMI (query ; key)")
    ax.set_xticks(np.asarray(next(iter(results.values()))["layers"]))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "Normalised mutual information per layer (0 = attention collapse)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(
    table: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    path: str,
    title: str = "",
    errors: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """Grouped bars: one group per model, one bar per metric (missing values skipped), optional error bars."""
    plt = _pyplot()
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 3.6))
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(names))
    for j, metric in enumerate(metrics):
        vals = [table[n].get(metric, np.nan) for n in names]
        err = [errors[n].get(metric, 0.0) for n in names] if errors else None
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=metric)
    finite = [v for n in names for m in metrics if np.isfinite(v := table[n].get(m, np.nan))]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5.0), min(100.0, max(finite) + 2.0))
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Accuracy per model", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_layers(
    series: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
    path: str,
    ylabel: str,
    title: str,
    bounds: Mapping[str, float] | None = None,
) -> str:
    """One line per model over layers with error bars: ``series`` is {name: (layers, mean, sd)}.

    ``bounds`` are drawn as labelled horizontal dashed lines (e.g. the uniform-attention distance).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for i, (name, (layers, mean, sd)) in enumerate(series.items()):
        jitter = (i - (len(series) - 1) / 2) * 0.04
        ax.errorbar(
            np.asarray(layers, np.float64) + jitter,
            mean,
            yerr=sd,
            marker="o",
            ms=3,
            capsize=3,
            color=f"C{i % 10}",
            label=name,
        )
    for j, (label, value) in enumerate((bounds or {}).items()):
        ax.axhline(value, color="gray", ls=("--", ":")[j % 2], lw=1, label=f"{label} ({value:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(np.asarray(next(iter(series.values()))[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_diagnostics(
    results: Mapping[str, Mapping[str, Any]], out_dir: str, prefix: str = ""
) -> dict[str, str]:
    """The two standard figures into ``out_dir``; returns {kind: path}."""
    return {
        "distance": plot_distance(results, os.path.join(out_dir, f"{prefix}attention_distance.png")),
        "nmi": plot_nmi(results, os.path.join(out_dir, f"{prefix}nmi.png")),
    }

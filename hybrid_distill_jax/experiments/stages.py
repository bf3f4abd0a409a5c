"""Cached experiment stages: a stage whose export and ``eval.json`` exist is reused, not rerun."""

from __future__ import annotations

import json
import os
import time

import jax

from hybrid_distill_jax import tasks
from hybrid_distill_jax.data import dataset_info
from hybrid_distill_jax.eval.features import probe_frozen_features
from hybrid_distill_jax.train import train


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
    task = tasks.build_task(config, info.num_classes)
    params = task.init_params(jax.random.key(config.seed))
    task.export(params, export)
    summary = dict(
        probe_frozen_features(config, task.feature_fn, params, info.num_classes), train_seconds=0.0
    )
    with open(marker, "w") as f:
        json.dump(summary, f, indent=2)
    return summary

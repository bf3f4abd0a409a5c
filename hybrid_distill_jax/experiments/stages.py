"""Cached experiment stages: a stage whose export and ``eval.json`` exist is reused, not rerun.

Each stage is a phase of its own (``signals.enter``: a signal between stages exits at once), and writes its
``eval.json`` whole or not at all, after its export: a stage stopped at any moment is redone, never taken
for finished.
"""

from __future__ import annotations

import json
import os
import time

import jax

from hybrid_distill_jax import errors, signals, tasks
from hybrid_distill_jax.data import dataset_info
from hybrid_distill_jax.eval.features import probe_frozen_features
from hybrid_distill_jax.train import train


def run_stage(config, workdir: str) -> dict:
    """Trains (or reuses) one stage; returns its evaluation plus its wall time."""
    signals.enter(config, "stage")
    done_marker = os.path.join(workdir, "eval.json")
    export = os.path.join(workdir, "export", "model.json")
    if os.path.exists(done_marker) and os.path.exists(export):
        print(f"[{config.name}] reusing {workdir}", flush=True)
        with open(done_marker) as f:
            return json.load(f)
    start = time.perf_counter()
    result = train(config, workdir)
    summary = dict(result.summary, train_seconds=time.perf_counter() - start)
    errors.write_atomically(done_marker, json.dumps(summary, indent=2).encode())
    return summary


def run_random_init_stage(config, workdir: str) -> dict:
    """The untrained student architecture, exported (for diagnostics and fine-tuning) and evaluated."""
    signals.enter(config, "stage")
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
    errors.write_atomically(marker, json.dumps(summary, indent=2).encode())
    return summary


def short_run(c, name: str, steps: int, batch: int, lr: float):
    """The schedule, logging and evaluation sizes shared by the demo's and the study's stages."""
    c.name = name
    c.batch_size = batch
    c.total_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = max(steps // 10, 1)
    c.optim.min_lr = lr / 100
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0
    c.log_every = 50
    c.checkpoint_every = 0
    c.eval.max_train = 10_000
    c.eval.batch_size = 500
    c.eval.linear_epochs = 30
    return c

"""The trainer: one loop for distillation and for the two teacher-training modes.

Sections: config -> mesh -> data -> task (models, frozen teachers) -> optimizer -> state (created
sharded) -> restore -> jitted step (one compile per masking stage) -> loop (log, checkpoint) ->
export -> evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_distill_jax import config_lib, evaluate
from hybrid_distill_jax.checkpoint import Checkpointer, abstract_like
from hybrid_distill_jax.data import dataset_info, eval_iterator, train_iterator
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.metrics import MetricWriter, Progress
from hybrid_distill_jax.optim import make_optimizer

log = logging.getLogger("hybrid_distill_jax")


def build_task(config, num_classes: int):
    if config.mode == "distill":
        from hybrid_distill_jax.distill import DistillTask

        return DistillTask(config)
    from hybrid_distill_jax.teachers import MAETask, SupervisedTask

    return {"supervised": SupervisedTask, "mae": MAETask}[config.mode](config, num_classes)


def make_mesh(config) -> jax.sharding.Mesh:
    devices = jax.device_count()
    if config.mesh.data not in (-1, devices):
        raise ConfigError(
            f"mesh.data={config.mesh.data} does not match the {devices} devices (use -1 for all)"
        )
    return jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass
class TrainResult:
    params: Any
    step: int
    export_dir: str
    summary: dict
    workdir: str
    compiles: int = 0


class Trainer:
    def __init__(self, config, workdir: str):
        # ---- config ------------------------------------------------------------------------------
        config_lib.validate(config)
        self.config = config
        self.workdir = config_lib.check_workdir(workdir)
        self.name = config.name

        # ---- mesh --------------------------------------------------------------------------------
        self.mesh = make_mesh(config)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))

        # ---- data --------------------------------------------------------------------------------
        self.info = dataset_info(config.data)
        self.total_steps, self.warmup_steps, self.steps_per_epoch = config_lib.resolve_steps(
            config, self.info.num_examples[config.data.train_split]
        )

        # ---- task and optimizer -------------------------------------------------------------------
        self.task = build_task(config, self.info.num_classes)
        self.frozen = jax.device_put(self.task.frozen, self.replicated)
        self.tx, self.lr_schedule = make_optimizer(
            config.optim, config.batch_size, self.total_steps, self.warmup_steps
        )

        # ---- state, created already sharded --------------------------------------------------------
        def init_state(rng):
            params = self.task.init_params(rng)
            return {
                "step": jnp.zeros((), jnp.int32),
                "params": params,
                "opt_state": self.tx.init(params),
                "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
            }

        abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
        shardings = jax.tree.map(lambda _: self.replicated, abstract)
        self._init_state = jax.jit(init_state, out_shardings=shardings)
        self.state_shardings = shardings
        self.checkpointer = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            every=config.checkpoint_every,
            keep=config.keep_checkpoints,
        )
        self._steps: dict[Any, Any] = {}
        self.compiles = 0

    # ---- the step ----------------------------------------------------------------------------------
    def _train_step(self, state, frozen, batch, static):
        self.compiles += 1  # runs once per trace, i.e. once per compilation
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grad_fn = jax.value_and_grad(self.task.loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state["params"], frozen, batch, rng, static)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=self.lr_schedule(state["step"]))
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    def step_fn(self, static):
        """The jitted step for one masking stage (static token counts), compiled on first use."""
        if static not in self._steps:
            self._steps[static] = jax.jit(
                lambda state, frozen, batch: self._train_step(state, frozen, batch, static),
                in_shardings=(self.state_shardings, self.replicated, self.batch_sharding),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=(0,),
            )
        return self._steps[static]

    def _device_batch(self, batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    # ---- restore or init ---------------------------------------------------------------------------
    def initial_state(self):
        state = self._init_state(jax.random.key(self.config.seed))
        latest = self.checkpointer.latest_step()
        if latest is None:
            return state, 0
        state, meta = self.checkpointer.restore(latest, abstract_like(state))
        log.info(
            "[%s] resumed from %s/%d (%s)", self.name, self.checkpointer.directory, latest, json.dumps(meta)
        )
        return state, int(latest)

    def _save(self, step, state):
        self.checkpointer.save(
            step, state, {"step": step, "name": self.name, "total_steps": self.total_steps}
        )

    # ---- loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        state, start = self.initial_state()
        writer = MetricWriter(self.workdir, cfg.tensorboard)
        progress = Progress(self.total_steps, cfg.batch_size, start)
        batches = train_iterator(
            cfg.data, image_size=cfg.image_size, global_batch=cfg.batch_size, seed=cfg.seed, start_step=start
        )
        log.info(
            "[%s] %d steps (%d/epoch), batch %d on %d device(s), starting at %d",
            self.name,
            self.total_steps,
            self.steps_per_epoch,
            cfg.batch_size,
            jax.device_count(),
            start,
        )
        pending = None
        for step in range(start, self.total_steps):
            static = self.task.static_args(step, self.total_steps)
            batch = self._device_batch(next(batches))
            state, metrics = self.step_fn(static)(state, self.frozen, batch)
            done = step + 1
            if pending is not None:  # read the previous report's metrics now: no host sync inside the loop
                self._report(writer, progress, *pending)
                pending = None
            if done % cfg.log_every == 0 or done == self.total_steps:
                extra = {"keep": static if isinstance(static, int) else -1} if cfg.mode == "distill" else {}
                pending = (done, metrics, extra)
            if self.checkpointer.due(done) or done == self.total_steps:
                progress.pause()
                self._save(done, state)
                progress.resume()
        if pending is not None:
            self._report(writer, progress, *pending)
        self.checkpointer.close()
        writer.flush()

        params = jax.device_get(state["params"])
        export_dir = cfg.export_dir or os.path.join(self.workdir, "export")
        if jax.process_index() == 0:
            self.task.export(params, export_dir)
        summary = self.evaluate(params) if cfg.eval.at_end else {}
        if summary:
            writer.write(self.total_steps, {f"eval/{k}": v for k, v in summary.items()})
            writer.flush()
            if jax.process_index() == 0:
                with open(os.path.join(self.workdir, "eval.json"), "w") as f:
                    json.dump(summary, f, indent=2)
        return TrainResult(params, self.total_steps, export_dir, summary, self.workdir, self.compiles)

    def _report(self, writer, progress, step, metrics, extra):
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(extra)
        if not np.isfinite(scalars["loss"]):
            log.warning("[%s] non-finite loss at step %d", self.name, step)
        rate = progress.report(step)
        writer.write(step, {**scalars, "img_per_s": rate["img_per_s"]})
        if jax.process_index() == 0:
            print(progress.line(self.name, step, scalars, rate), flush=True)

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, params) -> dict[str, float]:
        return evaluate_features(self.config, self.task.feature_fn, params, self.info.num_classes)


def evaluate_features(config, feature_fn, params, num_classes: int) -> dict[str, float]:
    """k-NN and linear probe on frozen features of the train split (subset) and the eval split."""
    ecfg, dcfg = config.eval, config.data
    if not (ecfg.knn or ecfg.linear):
        return {}
    start = time.perf_counter()
    params = jax.device_put(params)
    fn = jax.jit(lambda images: feature_fn(params, images))
    kw = dict(image_size=config.image_size, batch_size=ecfg.batch_size)
    train_x, train_y = evaluate.extract_features(
        fn, eval_iterator(dcfg, dcfg.train_split, max_examples=ecfg.max_train, **kw)
    )
    test_x, test_y = evaluate.extract_features(
        fn, eval_iterator(dcfg, dcfg.eval_split, max_examples=ecfg.max_test, **kw)
    )
    out = {}
    if ecfg.knn:
        knn = evaluate.knn_classify(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes=num_classes,
            k=ecfg.knn_k,
            temperature=ecfg.knn_temperature,
        )
        out["knn_top1"] = knn["top1"]
    if ecfg.linear:
        lin = evaluate.linear_probe(
            train_x, train_y, test_x, test_y, num_classes=num_classes, epochs=ecfg.linear_epochs
        )
        out["linear_top1"] = lin["top1"]
    out["eval_seconds"] = time.perf_counter() - start
    return out


def train(config, workdir: str) -> TrainResult:
    """Runs (or resumes) one training job described by ``config`` in ``workdir``."""
    return Trainer(config, workdir).run()

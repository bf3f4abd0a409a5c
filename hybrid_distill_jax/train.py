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
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_distill_jax import config_lib, diagnostics, evaluate, sharding
from hybrid_distill_jax.checkpoint import Checkpointer, abstract_like
from hybrid_distill_jax.data import dataset_info, eval_iterator, train_iterator
from hybrid_distill_jax.data.pipeline import unreadable_files
from hybrid_distill_jax.errors import CheckpointError
from hybrid_distill_jax.metrics import MetricWriter, Progress
from hybrid_distill_jax.optim import make_optimizer

log = logging.getLogger("hybrid_distill_jax")


def build_task(config, num_classes: int):
    if config.mode == "distill":
        from hybrid_distill_jax.distill import DistillTask

        return DistillTask(config)
    if config.mode == "finetune":
        from hybrid_distill_jax.finetune import FinetuneTask

        return FinetuneTask(config, num_classes)
    from hybrid_distill_jax.teachers import MAETask, SupervisedTask

    return {"supervised": SupervisedTask, "mae": MAETask}[config.mode](config, num_classes)


def make_mesh(config) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'model') mesh of ``config.mesh`` (see hybrid_distill_jax.sharding)."""
    return sharding.make_mesh(config.mesh)


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
        self.batch_sharding = sharding.batch_sharding(self.mesh)  # split over ('data', 'fsdp')

        # ---- data --------------------------------------------------------------------------------
        self.info = dataset_info(config.data)
        self.total_steps, self.warmup_steps, self.steps_per_epoch = config_lib.resolve_steps(
            config, self.info.num_examples[config.data.train_split]
        )

        # ---- task and optimizer -------------------------------------------------------------------
        self.task = build_task(config, self.info.num_classes)
        self.frozen_shardings = sharding.teacher_shardings(self.task.frozen, self.mesh, config.sharding)
        self.frozen = jax.device_put(self.task.frozen, self.frozen_shardings)
        # A task may bring its own optimizer (fine-tuning: layer-wise lr decay).
        self.tx, self.lr_schedule = getattr(self.task, "make_optimizer", make_optimizer)(
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
                "nonfinite": jnp.zeros((), jnp.int32),  # steps skipped for a NaN/Inf loss or gradient
                "first_nonfinite": jnp.full((), -1, jnp.int32),
            }

        abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
        shardings = sharding.state_shardings(abstract, self.mesh, config.sharding)
        split = sharding.describe(shardings["params"])
        log.info("[%s] mesh %s, params: %s", self.name, dict(self.mesh.shape), split)
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
        (loss, metrics), grads = sharding.accumulate_gradients(
            lambda params, b, r: grad_fn(params, frozen, b, r, static),
            state["params"],
            batch,
            rng,
            self.config.grad_accum_steps,
            self.mesh,
        )
        nan_at = self.config.faults.nan_at_step
        if nan_at >= 0:  # fault injection for tests of the guard: poison this step's gradients
            poison = jnp.where(state["step"] == nan_at, jnp.nan, 0.0)
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite step leaves params and optimizer state as they were (both policies skip it on
        # device; 'stop' then ends the run on the host at the next report).
        keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=keep_old(params, state["params"]),
            opt_state=keep_old(opt_state, state["opt_state"]),
            nonfinite=state["nonfinite"] + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where(
                (state["first_nonfinite"] < 0) & ~finite, state["step"] + 1, state["first_nonfinite"]
            ),
        )
        metrics = dict(
            metrics,
            grad_norm=grad_norm,
            lr=self.lr_schedule(state["step"]),
            nonfinite_steps=new_state["nonfinite"],
            first_nonfinite=new_state["first_nonfinite"],
        )
        return new_state, metrics

    def step_fn(self, static):
        """The jitted step for one masking stage (static token counts), compiled on first use."""
        if static not in self._steps:
            self._steps[static] = jax.jit(
                lambda state, frozen, batch: self._train_step(state, frozen, batch, static),
                in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=(0,),
            )
        return self._steps[static]

    def _device_batch(self, batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    # ---- restore or init ---------------------------------------------------------------------------
    def initial_state(self):
        """The latest complete checkpoint's state, or a fresh one. Unreadable checkpoints are skipped."""
        state = self._init_state(jax.random.key(self.config.seed))
        first_error = None
        for step in sorted(self.checkpointer.all_steps(), reverse=True):
            try:
                restored, meta = self.checkpointer.restore(step, abstract_like(state))
            except CheckpointError as e:  # a truncated step, or a config that does not fit: try older ones
                log.warning("[%s] cannot restore checkpoint %d, trying an older one: %s", self.name, step, e)
                first_error = first_error or e
                continue
            if first_error is not None:
                log.warning("[%s] resuming from step %d, the last complete checkpoint", self.name, step)
            log.info(
                "[%s] resumed from %s/%d (%s)", self.name, self.checkpointer.directory, step, json.dumps(meta)
            )
            return restored, int(step)
        if first_error is not None:
            raise first_error
        if hasattr(self.task, "pretrained_params"):  # a fresh fine-tuning run starts from loaded weights
            params = self.task.pretrained_params(state["params"])
            state["params"] = jax.device_put(params, self.state_shardings["params"])
        return state, 0

    def _save(self, step, state):
        self.checkpointer.save(
            step, state, {"step": step, "name": self.name, "total_steps": self.total_steps}
        )

    def _preemption_requested(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must agree on the step to checkpoint at
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step) or self._sigterm
        return self._sigterm

    def _check_finite(self, state) -> None:
        """On policy 'stop', ends the run if any step so far had a non-finite loss or gradient."""
        if self.config.nonfinite_policy == "stop":
            first = int(jax.device_get(state["first_nonfinite"]))
            if first >= 0:
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {first}; stopped (nonfinite_policy='stop'). "
                    f"The last checkpoint before it is intact in {self.checkpointer.directory}"
                )

    # ---- loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        state, start = self.initial_state()
        writer = MetricWriter(self.workdir, cfg.tensorboard)
        writer.truncate_after(start)  # a resumed run rewrites the metrics logged after its checkpoint
        progress = Progress(self.total_steps, cfg.batch_size, start)
        batches = sharding.prefetch_to_device(
            train_iterator(
                cfg.data,
                image_size=cfg.image_size,
                global_batch=cfg.batch_size,
                seed=cfg.seed,
                start_step=start,
            ),
            self._device_batch,
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
        self._sigterm = False
        previous_handler = _install_sigterm_handler(self)
        pending = None
        try:
            for step in range(start, self.total_steps):
                static = self.task.static_args(step, self.total_steps)
                batch = next(batches)  # already on the devices (prefetched)
                state, metrics = self.step_fn(static)(state, self.frozen, batch)
                done = step + 1
                if pending is not None:  # read the previous report now: no host sync inside the loop
                    self._report(writer, progress, *pending)
                    pending = None
                if done % cfg.log_every == 0 or done == self.total_steps:
                    extra = (
                        {"keep": static if isinstance(static, int) else -1} if cfg.mode == "distill" else {}
                    )
                    pending = (done, metrics, extra)
                    every = cfg.eval.get("diagnostics_every", 0)
                    if every and (done % every == 0 or done == self.total_steps):
                        progress.pause()  # attention diagnostics on the fixed eval set: not training time
                        writer.write(done, diagnostics.training_scalars(self, state["params"]))
                        progress.resume()
                preempted = self._preemption_requested(done)
                if self.checkpointer.due(done) or done == self.total_steps or preempted:
                    progress.pause()
                    self._check_finite(state)  # never checkpoint past a non-finite step under 'stop'
                    self._save(done, state)
                    progress.resume()
                if preempted:
                    if pending is not None:
                        self._report(writer, progress, *pending)
                    self.checkpointer.close()
                    writer.flush()
                    raise Preempted(done, self.checkpointer.directory)
            if pending is not None:
                self._report(writer, progress, *pending)
        finally:
            _restore_sigterm_handler(previous_handler)
        self.checkpointer.close()
        writer.flush()

        params = sharding.to_host(state["params"])  # gathers FSDP shards held by other processes
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
        first_nonfinite = int(scalars.pop("first_nonfinite"))
        scalars["unreadable_files"] = len(unreadable_files())
        if not np.isfinite(scalars["loss"]):
            log.warning("[%s] non-finite loss at step %d: update skipped", self.name, step)
        if first_nonfinite >= 0:
            self._check_finite({"first_nonfinite": first_nonfinite})
        rate = progress.report(step)
        writer.write(step, {**scalars, "img_per_s": rate["img_per_s"]})
        if jax.process_index() == 0:
            print(progress.line(self.name, step, scalars, rate), flush=True)

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, params) -> dict[str, float]:
        out = evaluate_features(self.config, self.task.feature_fn, params, self.info.num_classes)
        task_eval = getattr(self.task, "evaluate", None)  # e.g. a fine-tuned classifier's own top-1
        return {**out, **task_eval(params)} if task_eval else out


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


class Preempted(Exception):
    """SIGTERM (or a multi-host preemption notice) arrived; a checkpoint was written at ``step``."""

    exit_code = 75  # EX_TEMPFAIL: try again later (rerun the same command to resume)

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted: checkpoint written at step {step} in {directory}; rerun to resume")
        self.step = step


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under ``nonfinite_policy='stop'``."""

    exit_code = 3


def _install_sigterm_handler(trainer):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        trainer._sigterm = True
        log.warning("[%s] SIGTERM: checkpointing at the next step boundary, then exiting", trainer.name)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm_handler(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def train(config, workdir: str) -> TrainResult:
    """Runs (or resumes) one training job described by ``config`` in ``workdir``."""
    return Trainer(config, workdir).run()

"""The trainer: one loop for every task (distillation, teacher training, fine-tuning).

Sections: config -> mesh -> data -> task (models, frozen teachers) -> optimizer -> state (created
sharded) -> restore -> jitted step (one compile per stage) -> loop (log, checkpoint, preemption) ->
export -> final evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from hybrid_distill_jax import config_lib, errors, signals, tasks, workdir_lock
from hybrid_distill_jax.data import dataset_info, train_iterator
from hybrid_distill_jax.data.pipeline import unreadable_files
from hybrid_distill_jax.data.prefetch import prefetch_to_device, to_devices
from hybrid_distill_jax.errors import CheckpointError, NonFiniteError, Preempted
from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.eval.features import probe_frozen_features
from hybrid_distill_jax.optim import resolve_steps
from hybrid_distill_jax.parallel import sharding
from hybrid_distill_jax.train import preflight, run_config
from hybrid_distill_jax.train.checkpoint import Checkpointer, abstract_like
from hybrid_distill_jax.train.metrics import ExampleLog, MetricWriter, Progress
from hybrid_distill_jax.train.program import build_program
from hybrid_distill_jax.train.step import ema_of

log = logging.getLogger("hybrid_distill_jax")


@dataclasses.dataclass
class TrainResult:
    params: Any
    step: int
    export_dir: str
    summary: dict
    compiles: int = 0


class Trainer:
    def __init__(self, config, workdir: str):
        # ---- config ------------------------------------------------------------------------------
        config_lib.validate(config)
        self.config = config
        self.workdir = workdir_lock.check_workdir(workdir)
        self.name = config.name

        # ---- mesh --------------------------------------------------------------------------------
        self.mesh = sharding.make_mesh(config.mesh)

        # ---- data --------------------------------------------------------------------------------
        signals.enter(config, "data")
        self.info = dataset_info(config.data)
        preflight.check_before_training(config, self.info, self.workdir)  # what the end needs, up front
        run_config.check_resume(config, self.workdir)
        self.total_steps, self.warmup_steps, self.steps_per_epoch = resolve_steps(
            config, self.info.num_examples[config.data.train_split]
        )

        # ---- task, optimizer, state shapes and shardings: the program the step compiles to ------------
        self.task = tasks.build_task(config, self.info.num_classes)
        self.program = build_program(
            config,
            self.task,
            self.mesh,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            nan_at_step=config.faults.nan_at_step,
        )
        self.frozen = jax.device_put(self.task.frozen, self.program.frozen_shardings)
        split = sharding.describe(self.program.state_shardings["params"])
        log.info("[%s] mesh %s, params: %s", self.name, dict(self.mesh.shape), split)
        self._init_state = self.program.jitted_init()  # the state is created already sharded
        self.checkpointer = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            every=config.checkpoint_every,
            keep=config.keep_checkpoints,
        )
        self._steps: dict[Any, Any] = {}
        self.compiles = 0
        self._diagnostics_hook = None

    # ---- the step ----------------------------------------------------------------------------------
    def _counted_step(self, state, frozen, batch, stage):
        self.compiles += 1  # runs once per trace, i.e. once per compilation
        signals.enter(self.config, "compile" if self.compiles == 1 else "recompile")
        return self.program.step(state, frozen, batch, stage)

    def step_fn(self, stage):
        """The jitted step for one stage (static token counts), compiled on first use."""
        if stage not in self._steps:
            self._steps[stage] = self.program.jitted(stage, self._counted_step)
        return self._steps[stage]

    def _device_batch(self, batch: dict) -> dict:
        """The step's inputs on the devices: uint8 images and labels (``index`` stays on the host)."""
        return to_devices(batch, self.program.batch_sharding)  # split over ('data', 'fsdp')

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
        params = self.task.pretrained_params(state["params"])  # e.g. fine-tuning from loaded weights
        if params is not state["params"]:
            state["params"] = jax.device_put(params, self.program.state_shardings["params"])
            if "ema" in state:
                state["ema"] = jax.device_put(ema_of(params), self.program.state_shardings["ema"])
        if "stats" in state and self.task.estimation_batches:
            stats = self._estimate_stats(state["stats"])
            state["stats"] = jax.device_put(stats, self.program.state_shardings["stats"])
        return state, 0

    def _estimate_stats(self, stats):
        """The task's statistics from the first training batches (the stream training then reads from its
        start): a fresh run's, once; a resume restores them with the rest of the state."""
        cfg, count = self.config, self.task.estimation_batches
        log.info("[%s] estimating target statistics from the first %d training batches", self.name, count)
        host_batches = train_iterator(
            cfg.data, image_size=cfg.image_size, global_batch=cfg.batch_size, seed=cfg.seed, start_step=0
        )
        try:
            batches = (self._device_batch(next(host_batches)) for _ in range(count))
            return self.task.estimate_stats(self.frozen, stats, batches)
        finally:
            host_batches.close()

    def _save(self, step, state):
        self.checkpointer.save(
            step, state, {"step": step, "name": self.name, "total_steps": self.total_steps}
        )

    def _preemption_requested(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must agree on the step to checkpoint at
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step) or signals.requested() is not None
        return signals.requested() is not None

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
    @signals.handling()
    def run(self) -> TrainResult:
        """Trains (or resumes) to ``total_steps``, exports and evaluates, answering signals throughout; the
        workdir's lock is given up when it returns or fails, so another process may continue in the
        workdir."""
        try:
            return self._run()
        finally:
            workdir_lock.release(self.workdir)

    def _run(self) -> TrainResult:
        cfg = self.config
        state, start = self.initial_state()
        run_config.save(cfg, self.workdir)
        writer = MetricWriter(self.workdir, cfg.tensorboard)
        writer.truncate_after(start)  # a resumed run rewrites the metrics logged after its checkpoint
        progress = Progress(self.total_steps, cfg.batch_size, start)
        host_batches = train_iterator(
            cfg.data,
            image_size=cfg.image_size,
            global_batch=cfg.batch_size,
            seed=cfg.seed,
            start_step=start,
        )
        example_log = None
        if cfg.data.get("log_example_ids", False):
            example_log = ExampleLog(self.workdir, start)
            host_batches = example_log.track(host_batches)
        batches = prefetch_to_device(host_batches, self._device_batch)
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
        try:
            for step in range(start, self.total_steps):
                stage = self.task.stage(step, self.total_steps)
                batch = next(batches)  # already on the devices (prefetched)
                state, metrics = self.step_fn(stage)(state, self.frozen, batch)
                done = step + 1
                signals.set_unsaved_progress(True)  # a signal now waits for the step boundary below
                signals.enter(cfg, "train")
                if example_log is not None:
                    example_log.write(done)
                if pending is not None:  # read the previous report now: no host sync inside the loop
                    self._report(writer, progress, *pending)
                    pending = None
                if done % cfg.log_every == 0 or done == self.total_steps:
                    pending = (done, metrics, self.task.stage_metrics(stage))
                    every = cfg.eval.get("diagnostics_every", 0)
                    if every and (done % every == 0 or done == self.total_steps):
                        progress.pause()  # attention diagnostics on the fixed eval set: not training time
                        writer.write(done, self._diagnostics(state["params"]))
                        progress.resume()
                preempted = self._preemption_requested(done)
                if preempted:
                    signals.acknowledge()
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
                    raise Preempted(done, self.checkpointer.directory, signals.requested())
            if pending is not None:
                self._report(writer, progress, *pending)
            self.checkpointer.close()  # the last checkpoint is on disk: nothing left to lose
        except BaseException:  # any exit: finish the write in flight, so no writer thread outlives the run
            self.checkpointer.close_quietly()
            raise
        finally:
            batches.close()  # ends the input pipeline's thread (and host_batches with it)
            host_batches.close()
            signals.set_unsaved_progress(False)
        writer.flush()

        params = sharding.to_host(state["params"])  # gathers FSDP shards held by other processes
        ema = sharding.to_host(state["ema"]) if "ema" in state else None
        stats = sharding.to_host(state["stats"]) if "stats" in state else None
        export_dir = preflight.export_dir(cfg, self.workdir)
        exports = {export_dir: params}
        if ema is not None and cfg.ema.export != "online":
            exports = {export_dir: ema}
            if cfg.ema.export == "both":
                exports[preflight.online_export_dir(export_dir)] = params
        if jax.process_index() == 0:
            signals.enter(cfg, "export")
            for directory, weights in exports.items():
                self.task.export(weights, directory, stats=stats)
        summary = {}
        if cfg.eval.at_end:
            summary = self.final_evaluation(params)
            if ema is not None:  # the EMA weights' probes beside the online ones
                summary.update({f"ema_{k}": v for k, v in self.final_evaluation(ema).items()})
        if summary:
            writer.write(self.total_steps, {f"eval/{k}": v for k, v in summary.items()})
            writer.flush()
            if jax.process_index() == 0:
                eval_json = json.dumps(summary, indent=2).encode()
                errors.write_atomically(os.path.join(self.workdir, "eval.json"), eval_json)
        return TrainResult(params, self.total_steps, export_dir, summary, self.compiles)

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

    def _diagnostics(self, params) -> dict[str, float]:
        """``diag/...`` scalars of the model being trained (the hook and its eval set are built once)."""
        if self._diagnostics_hook is None:
            self._diagnostics_hook = diagnostics.TrainingDiagnostics(self.config, self.task)
        return self._diagnostics_hook(params)

    # ---- evaluation --------------------------------------------------------------------------------
    def final_evaluation(self, params) -> dict[str, float]:
        """Frozen-feature probes of the trained ViT, plus the task's own end-of-run metrics."""
        signals.enter(self.config, "eval")
        out = probe_frozen_features(self.config, self.task.feature_fn, params, self.info.num_classes)
        return {**out, **self.task.final_metrics(params)}


@signals.handling()
def train(config, workdir: str) -> TrainResult:
    """Runs (or resumes) one training job described by ``config`` in ``workdir``, answering signals from
    its data preparation on (``signals.handling``)."""
    return Trainer(config, workdir).run()


def run(config, workdir: str) -> None:
    """A training mode from the command line (``config_lib.MODES``): trains, prints the summary and the
    export directory."""
    result = train(config, workdir)
    if result.summary:
        print({k: round(v, 2) for k, v in result.summary.items()})
    print(f"exported to {result.export_dir}")

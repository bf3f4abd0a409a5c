"""Metric writers (JSONL + TensorBoard), the example-id log and a progress line with throughput and ETA."""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

from hybrid_distill_jax import errors

log = logging.getLogger("hybrid_distill_jax")


class MetricWriter:
    """Appends ``{"step": s, ...}`` lines to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tb_dir = os.path.join(workdir, "tensorboard")
        self._tb = None
        if self.active and tensorboard:
            try:
                import tensorboard  # noqa: F401  (tf.summary needs it for scalars)
                import tensorflow as tf

                with self._writing_tensorboard():
                    self._tb = tf.summary.create_file_writer(self._tb_dir)
            except ImportError:  # TensorBoard is optional: JSONL still gets everything.
                log.warning("tensorboard/tensorflow not importable: TensorBoard summaries are off")

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after ``step``: a resumed run logs those steps again, identically."""
        if not self.active or not os.path.exists(self._path):
            return
        kept = [line for line in read_metrics(os.path.dirname(self._path)) if line["step"] <= step]
        errors.write_atomically(self._path, "".join(json.dumps(line) + "\n" for line in kept).encode())

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        errors.append_line(self._path, json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            import tensorflow as tf

            with self._writing_tensorboard(), self._tb.as_default(step=int(step)):
                for k, v in scalars.items():
                    tf.summary.scalar(k, v)

    def flush(self) -> None:
        if self._tb is not None:
            with self._writing_tensorboard():
                self._tb.flush()

    @contextlib.contextmanager
    def _writing_tensorboard(self):
        """TensorFlow's error writing the event file (a full disk: ResourceExhaustedError) as an OSError
        naming the TensorBoard directory, reported like any other failed write."""
        import tensorflow as tf

        try:
            yield
        except tf.errors.OpError as e:
            full = "No space left on device" in e.message
            reason = os.strerror(errno.ENOSPC) if full else e.message.strip().splitlines()[-1]
            raise OSError(errno.ENOSPC if full else errno.EIO, reason, self._tb_dir) from None


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: the resumed run rewrites it
                continue
    return rows


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Measures images/s between reports (excluding paused time, e.g. evaluation) and estimates the ETA."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
        self.total_steps, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._paused = 0.0

    def pause(self):
        self._pause_start = time.perf_counter()

    def resume(self):
        self._paused += time.perf_counter() - self._pause_start

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time - self._paused, 1e-9)
        steps = step - self._last_step
        self._last_step, self._last_time, self._paused = step, now, 0.0
        sec_per_step = elapsed / max(steps, 1)
        return {
            "img_per_s": steps * self.batch_size / elapsed,
            "eta_s": sec_per_step * (self.total_steps - step),
        }

    def line(self, name: str, step: int, scalars: Mapping[str, float], rate: Mapping[str, float]) -> str:
        # The total, each loss term's value (the distill task's ``NAME_loss``, whatever its terms are
        # called), then accuracy and the kept-patch count.
        term_keys = sorted(k for k in scalars if k.endswith("_loss"))
        keys = [k for k in ("loss", *term_keys, "accuracy", "keep") if k in scalars]
        terms = " ".join(f"{k} {scalars[k]:.4g}" for k in keys)
        return (
            f"[{name}] step {step}/{self.total_steps} | {terms} | lr {scalars.get('lr', 0):.3g} | "
            f"{rate['img_per_s']:.0f} img/s | ETA {_duration(rate['eta_s'])}"
        )


class ExampleLog:
    """Which examples this process fed at each step: ``{"step": s, "index": [...]}`` lines appended to
    ``WORKDIR/examples.process{i}.jsonl`` (``config.data.log_example_ids``; each batch's ``index``).

    Host batches are read ahead of the step that uses them (prefetch), so their indices wait in a queue
    until that step ran. A resumed run drops the lines written after its checkpoint.
    """

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, f"examples.process{jax.process_index()}.jsonl")
        self._queue: collections.deque = collections.deque()
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        errors.write_atomically(self.path, "".join(kept).encode())

    def track(self, batches):
        for batch in batches:
            self._queue.append(np.asarray(batch["index"]).tolist())
            yield batch

    def write(self, step: int) -> None:
        errors.append_line(self.path, json.dumps({"step": step, "index": self._queue.popleft()}) + "\n")

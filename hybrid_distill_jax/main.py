"""Entry point: ``python -m hybrid_distill_jax.main --config configs/<recipe>.py --workdir DIR``.

Any field can be overridden on the command line: ``--config.batch_size=256 --config.loss.beta=0``.
A config whose ``mode`` is ``demo`` runs the whole embedded-data chain (see ``configs/demo.py``).

Multi-host runs start one process per host (or per GPU under SLURM) with the same command; see
``docs/SCALING.md`` and ``launch/``. ``--coordinator_address/--num_processes/--process_id`` (or the
``JAX_*`` environment, or SLURM/TPU-pod auto-detection) join them before any device is touched.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hybrid_distill_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteError, Preempted

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports and summaries.")
flags.mark_flags_as_required(["config", "workdir"])
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Multi-process start-up (hybrid_distill_jax.parallel.distributed).",
)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.DEFINE_string("local_device_ids", None, "Comma-separated local device ids for this process.")


def _setup_jax(workdir: str) -> None:
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.abspath(workdir), ".jax_cache"
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _train(config, workdir: str) -> None:
    from hybrid_distill_jax.train import train

    result = train(config, workdir)
    if result.summary:
        print({k: round(v, 2) for k, v in result.summary.items()})
    print(f"exported to {result.export_dir}")


def _demo(config, workdir: str) -> None:
    from hybrid_distill_jax.experiments.demo import run_demo

    run_demo(config, workdir)


def _study(config, workdir: str) -> None:
    from hybrid_distill_jax.experiments.study import run_study

    run_study(config, workdir)


def _evaluate(config, workdir: str) -> None:
    from hybrid_distill_jax.experiments.analyze import evaluate_model_dir

    evaluate_model_dir(config, workdir)


# config.mode -> what runs it; every other mode is a training task (hybrid_distill_jax.tasks).
RUNNERS = {"demo": _demo, "study": _study, "evaluate": _evaluate}


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = FLAGS.config
    try:
        from hybrid_distill_jax.parallel import distributed

        distributed.initialize(  # before anything touches a device
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.local_device_ids,
            mode=FLAGS.distributed,
        )
        _setup_jax(FLAGS.workdir)
        RUNNERS.get(config.get("mode"), _train)(config, FLAGS.workdir)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Preempted, NonFiniteError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()

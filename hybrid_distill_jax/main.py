"""Entry point: ``python -m hybrid_distill_jax.main --config configs/<recipe>.py --workdir DIR``.

Any field can be overridden on the command line: ``--config.batch_size=256 --config.loss.beta=0``.
A config whose ``mode`` is ``demo`` runs the whole embedded-data chain (see ``configs/demo.py``).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hybrid_distill_jax.errors import CheckpointError, ConfigError, DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports and summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def _setup_jax(workdir: str) -> None:
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.abspath(workdir), ".jax_cache"
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = FLAGS.config
    try:
        _setup_jax(FLAGS.workdir)
        if config.get("mode") == "demo":
            from hybrid_distill_jax.demo import run_demo

            run_demo(config, FLAGS.workdir)
        else:
            from hybrid_distill_jax.train import train

            result = train(config, FLAGS.workdir)
            if result.summary:
                print({k: round(v, 2) for k, v in result.summary.items()})
            print(f"exported to {result.export_dir}")
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()

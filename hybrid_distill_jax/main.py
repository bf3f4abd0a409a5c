"""Entry point: ``python -m hybrid_distill_jax.main --config configs/<recipe>.py --workdir DIR``.

Any field can be overridden on the command line: ``--config.batch_size=256``,
``--config.terms.relation.weight=0``.
``config.mode`` picks what runs (``config_lib.MODES``): a training task, ``evaluate``, or the ``demo``
(the whole embedded-data chain, ``configs/demo.py``) and ``study`` chains.

Multi-host runs start one process per host (or per GPU under SLURM) with the same command; see
``docs/SCALING.md`` and ``launch/``. ``--coordinator_address/--num_processes/--process_id`` (or the
``JAX_*`` environment, or SLURM/TPU-pod auto-detection) join them before any device is touched.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hybrid_distill_jax import errors, signals
from hybrid_distill_jax.config_file import parse_flags_or_exit

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command line's flags (a function so that tests can parse into a fresh ``FlagValues``)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file (configs/*.py).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, metrics, exports and summaries.", flag_values=flag_values
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "on", "off"],
        "Multi-process start-up (hybrid_distill_jax.parallel.distributed).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes in a multi-process run.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index, 0..num_processes-1.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "local_device_ids",
        None,
        "Comma-separated local device ids for this process.",
        flag_values=flag_values,
    )


define_flags(FLAGS)


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

    def start_up() -> None:
        from hybrid_distill_jax import hardware
        from hybrid_distill_jax.parallel import distributed

        hardware.check_platforms()  # JAX_PLATFORMS naming hardware this host lacks: one line, nothing started
        distributed.initialize(  # before anything touches a device
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.local_device_ids,
            mode=FLAGS.distributed,
        )
        _setup_jax(FLAGS.workdir)

    return run_config(FLAGS.config, FLAGS.workdir, start_up=start_up)


def run_config(config, workdir: str, start_up=None) -> int:
    """Runs ``config`` in ``workdir``: every expected failure is one line on stderr and its exit status."""

    def run():
        signals.enter(config, "startup")
        if start_up is not None:
            start_up()
        # Not at the top: run() installs the signal handlers before the config layer loads JAX.
        from hybrid_distill_jax import config_lib

        module, _, function = config_lib.mode_of(config).run.partition(":")
        getattr(importlib.import_module(module), function)(config, workdir)

    return errors.exit_status_of(run)


def run() -> None:
    signals.install()  # first: a signal during start-up already exits with its documented status
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    run()

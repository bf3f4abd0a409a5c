"""Entry point: ``python -m hybrid_distill_jax.main --config configs/<recipe>.py --workdir DIR``.

Any field can be overridden on the command line: ``--config.batch_size=256``,
``--config.terms.relation.weight=0``.
A config whose ``mode`` is ``demo`` runs the whole embedded-data chain (see ``configs/demo.py``).

Multi-host runs start one process per host (or per GPU under SLURM) with the same command; see
``docs/SCALING.md`` and ``launch/``. ``--coordinator_address/--num_processes/--process_id`` (or the
``JAX_*`` environment, or SLURM/TPU-pod auto-detection) join them before any device is touched.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback
import types

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from hybrid_distill_jax import errors, signals
from hybrid_distill_jax.errors import ConfigError

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


# ------------------------------------------------------------------------------------------ config file


def load_config_file(spec: str) -> ConfigDict:
    """``get_config()`` of ``PATH`` (or ``get_config(ARG)`` of ``PATH:ARG``).

    Every failure is a ConfigError naming the file and what is wrong with it: missing, a directory,
    unreadable, not Python, an exception while it runs, no ``get_config``, or not returning a ConfigDict.
    """
    path, *arg = spec.split(":", 1)
    where = f"--config={path}"
    if not path:
        raise ConfigError("--config: empty path; pass a config file such as configs/demo.py")
    if not os.path.exists(path):
        raise ConfigError(f"{where}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{where} is a directory; pass a config file such as configs/demo.py")
    source = errors.read_bytes(path, ConfigError, where)
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes (a binary file)
        line = f" line {e.lineno}:" if getattr(e, "lineno", None) else ""
        raise ConfigError(f"{where}: not a valid Python config file:{line} {getattr(e, 'msg', e)}") from None
    module = types.ModuleType(os.path.splitext(os.path.basename(path))[0])
    module.__file__ = os.path.abspath(path)
    try:
        exec(code, module.__dict__)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigError(f"{where}: defines no get_config() function")
        config = get_config(*arg)
    except ConfigError:
        raise
    except Exception as e:  # the config file's own code failed: report where, in one line
        moved = _renamed_on_line(source, path, e) if isinstance(e, AttributeError) else None
        if moved:
            raise ConfigError(f"{where}: {_where_in(path, e)}{moved}") from None
        raise ConfigError(f"{where}: {_where_in(path, e)}{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{where}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _renamed_on_line(source: bytes, path: str, e: BaseException) -> str | None:
    """For a config file that failed on a missing field: the rename hint of a renamed field named on the
    failing line (``c.loss.alpha = 0`` -> use terms.feature.weight), else None."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    if not lines:
        return None
    text = source.decode("utf-8", "replace").splitlines()[lines[-1] - 1]
    for dotted in re.findall(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", text):
        parts = dotted.split(".")  # c.loss.alpha: try loss.alpha, then alpha
        for start in range(len(parts)):
            if hint := rename_hint(".".join(parts[start:])):
                return hint
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _where_in(path: str, e: BaseException) -> str:
    """'line N: ' of the innermost frame of ``e`` inside ``path`` (the line to fix)."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    return f"line {lines[-1]}: " if lines else ""


def field_names(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted field name of ``config`` (nested ConfigDicts and their leaves)."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ConfigDict):
            names.extend(field_names(value, f"{prefix}{key}."))
    return names


def check_override_names(config: ConfigDict, names: list[str]) -> None:
    """A ConfigError for the first ``--config.NAME`` that is not a field, suggesting the closest ones."""
    valid = set(field_names(config))
    for name in names:
        if name not in valid:
            moved = rename_hint(name, config.get("mode"))
            if moved:
                raise ConfigError(f"--config.{moved}")
            close = difflib.get_close_matches(name, sorted(valid), n=3, cutoff=0.6)
            if close:
                hint = f"did you mean {' or '.join(f'--config.{c}' for c in close)}?"
            else:  # nothing close: the fields where it was looked for
                parent = name.rpartition(".")[0]
                while parent and parent not in valid:
                    parent = parent.rpartition(".")[0]
                siblings = [v for v in field_names(config) if v.rpartition(".")[0] == parent]
                hint = f"fields there: {', '.join(siblings)}"
            raise ConfigError(f"--config.{name}: no such field in the config; {hint}")


def rename_hint(name: str, mode: str | None = None) -> str | None:
    """The hint naming the new field when ``name`` is one that the task of ``mode`` (any task, for None)
    renamed, else None."""
    from hybrid_distill_jax.tasks import TASKS  # the error paths only: tasks import the models

    tasks = TASKS.values() if mode is None else [TASKS[mode]] if mode in TASKS else []
    return next((hint for task in tasks if (hint := task.renamed(name))), None)


def override_names(argv: list[str]) -> list[str]:
    """The dotted names of the ``--config.NAME[=VALUE]`` (and ``--noconfig.NAME``) overrides in ``argv``."""
    names = []
    for arg in argv[1:]:
        if arg == "--":
            break
        match = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
        if match:
            names.append(match.group(1))
    return names


class _ConfigFileParser(flags.ArgumentParser):
    """Loads ``--config`` with one-line errors and checks the override names against it, before absl
    defines a flag per override (which fails with a bare KeyError for an unknown name)."""

    def __init__(self, argv: list[str]):
        self.names = override_names(argv)
        self.numeric_tuples: set[str] = set()  # overridden fields whose default is a tuple of numbers

    def parse(self, argument):
        config = load_config_file(argument)
        check_override_names(config, self.names)
        for name in self.names:
            value = _get(config, name)
            if isinstance(value, tuple) and value and all(_is_number(v) for v in value):
                self.numeric_tuples.add(name)
        config.lock()
        return config

    def flag_type(self):
        return "config object"


def _get(config: ConfigDict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Parses the command line; a bad flag, config file or override is a one-line ConfigError."""
    parser = _ConfigFileParser(argv)
    flag_values["config"].parser = parser
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__context__
        if cause is not None:
            raise cause from None
        raise ConfigError(_flag_error_message(e, flag_values)) from None
    for name in parser.numeric_tuples:  # '(0.2' parses as the 1-tuple ('(0.2',): a malformed tuple
        value = _get(flag_values.config, name)
        if not all(_is_number(v) for v in value):
            raise ConfigError(
                f"--config.{name}={value!r}: expected a tuple of numbers, e.g. --config.{name}='(0.2, 1.0)'"
            )
    return rest


def _flag_error_message(e: flags.Error, flag_values: flags.FlagValues) -> str:
    """absl's 'flag --config.x=v: reason' as '--config.x=v: expected TYPE (reason)'."""
    message = _first_line(e)
    match = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)", message)
    if match and match.group(1) in flag_values:
        name, value, reason = match.groups()
        kind = flag_values[name].flag_type().removeprefix("multi ")  # a tuple override is a MultiFlag
        return f"--{name}={value}: expected {kind} ({reason})"
    return message.removeprefix("flag ")


def parse_flags_or_exit(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """``parse_flags`` for ``app.run``: a bad command line is one line on stderr and exit status 2."""
    try:
        return parse_flags(argv, flag_values)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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

    def start_up() -> None:
        from hybrid_distill_jax.parallel import distributed

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
        signals.pause_for_fault(config, "startup")
        if start_up is not None:
            start_up()
        RUNNERS.get(config.get("mode"), _train)(config, workdir)

    return errors.exit_status_of(run)


def run() -> None:
    signals.install()  # first: a signal during start-up already exits with its documented status
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    run()

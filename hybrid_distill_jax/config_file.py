"""The command line's config: ``--config=FILE[:ARG]`` loaded and its ``--config.NAME=VALUE`` overrides
checked, every failure one line (a ConfigError).

The entry points (``main``, ``compile``, the benchmarks) parse with ``parse_flags_or_exit``: absl would
otherwise print a traceback for a config file that fails and a bare KeyError for an unknown override.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
import types

from absl import flags
from ml_collections import ConfigDict

from hybrid_distill_jax import errors
from hybrid_distill_jax.errors import ConfigError


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
        raise ConfigError(f"{where}: {_where_in(path, e)}{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{where}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


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


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
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


def parse_flags_or_exit(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``parse_flags`` for ``app.run``: a bad command line is one line on stderr and exit status 2."""
    try:
        return parse_flags(argv, flag_values)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

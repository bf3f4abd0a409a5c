"""What the trainer checks before it builds the program: the inputs and outputs that need more than the
config, i.e. the dataset's splits and the export directories on the file system.

``config_lib.validate`` checks what the config alone says; these checks need the dataset's description
(``dataset_info``) or the file system, so the trainer runs ``check_before_training`` once it has them and
before anything is compiled. A run that would otherwise train to its end and then fail (an eval split the
dataset lacks, an export directory that cannot be written) is refused before its first step, in one line
naming the field (a ``ConfigError``: exit status 2).
"""

from __future__ import annotations

import os
import re
import tempfile

import jax

from hybrid_distill_jax.data.common import DatasetInfo
from hybrid_distill_jax.errors import ConfigError


def check_before_training(config, info: DatasetInfo, workdir: str) -> None:
    """The splits the run reads exist (``check_splits``) and its exports can be written
    (``check_export_dirs``); raises a one-line ``ConfigError``. Reads no data, leaves nothing written."""
    check_splits(config, info)
    if jax.process_index() == 0:  # the only process that exports
        check_export_dirs(config, workdir)


# ------------------------------------------------------------------------------------------------ splits


# What reads the eval split (config.eval's fields) -> the value that turns it off.
_EVAL_READERS = {"at_end": False, "diagnostics_every": 0}


def _split_names(split: str) -> list[str]:
    """The splits a split expression reads: 'train[:90%]+validation' -> ['train', 'validation'] (TFDS's
    slicing syntax; a folder split is a plain name)."""
    return [re.sub(r"\[.*\]$", "", piece).strip() for piece in split.split("+")]


def check_splits(config, info: DatasetInfo) -> None:
    """The train split exists in the dataset, and so does the eval split when the run reads it: the
    evaluation at the end (``config.eval.at_end``) or the attention diagnostics during training
    (``config.eval.diagnostics_every``)."""
    readers = {"train_split": "training reads it"}
    uses = {name: off for name, off in _EVAL_READERS.items() if config.eval.get(name)}
    if uses:
        now = ", ".join(f"config.eval.{name}={config.eval[name]!r}" for name in uses)
        off = ", ".join(f"config.eval.{name}={value!r}" for name, value in uses.items())
        readers["eval_split"] = f"the run reads it ({now}): name one of those splits, or set {off}"
    for name, why in readers.items():
        split = config.data[name]
        missing = [s for s in _split_names(split) if s not in info.num_examples]
        if missing:
            raise ConfigError(
                f"config.data.{name}={split!r}: dataset {_describe(config.data, info)} has no split "
                f"{missing[0]!r} (its splits: {', '.join(sorted(info.num_examples)) or 'none'}); {why}"
            )


def _describe(data_cfg, info: DatasetInfo) -> str:
    root = data_cfg.get("data_dir")
    return f"{info.name!r}" + (f" in {root}" if root else "")


# --------------------------------------------------------------------------------------------- exports


def export_dir(config, workdir: str) -> str:
    """Where the trained weights are exported: ``config.export_dir``, by default ``WORKDIR/export``."""
    return config.export_dir or os.path.join(workdir, "export")


def online_export_dir(directory: str) -> str:
    """Where ``ema.export='both'`` exports the online weights, beside the EMA's in ``directory``."""
    return directory.rstrip(os.sep) + "_online"


def export_dirs(config, workdir: str) -> list[str]:
    """Every directory the run exports to: ``export_dir``, and its ``_online`` twin under
    ``ema.export='both'`` with an EMA (``ema.decay`` > 0)."""
    main = export_dir(config, workdir)
    both = config.ema.decay > 0 and config.ema.export == "both"
    return [main, online_export_dir(main)] if both else [main]


def check_export_dirs(config, workdir: str) -> None:
    """Each export directory is a directory that can be written, or can be created (not a regular file,
    nor under one), checked before the run rather than after its last step. Nothing is created: a probe
    file in the directory (or its nearest existing parent, where it would be created) is written and
    removed, so that the file system answers, read-only mounts and root's rights included."""
    field = f"export_dir={config.export_dir!r}" if config.export_dir else "export_dir='' (WORKDIR/export)"
    for directory in export_dirs(config, workdir):
        existing = os.path.abspath(directory)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            what = "exists and" if existing == os.path.abspath(directory) else f"is under {existing}, which"
            raise ConfigError(f"{field}: {directory} {what} is not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".write_test", dir=existing)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"{field}: {directory} cannot be written ({existing}: {e.strerror})") from None

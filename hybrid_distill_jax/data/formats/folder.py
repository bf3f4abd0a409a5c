"""The image-folder format (``config.data.name='folder'``): ``data_dir/<split>/<class>/*.jpg|jpeg|png``,
held in memory as sorted file paths; a file that cannot be read is handled by the pipeline.

The listing reads those three levels and no deeper, so it never recurses. Symbolic links are followed
(a dataset assembled from links is common), except a link loop: a folder link back to its own folder or
one above it (or to itself) is skipped with a warning, since following it would list the dataset again
as a split or class of itself; an image file's link that loops is listed, and reading it fails like any
unreadable file (``data.on_corrupt``). Followed, either would stop the run (``Too many levels of
symbolic links``, or a class folder the train split lacks).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import numpy as np
import tensorflow as tf

from hybrid_distill_jax.data.common import (
    FOLDER,
    DatasetInfo,
    Source,
    expanded_data_dir,
    field,
    split_field,
    too_small,
)
from hybrid_distill_jax.data.formats.base import Format, register
from hybrid_distill_jax.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)
_skipped_loops: set[str] = set()  # the link loops warned about, once each per process


def _folder_root(data_cfg: Any) -> str:
    return expanded_data_dir(data_cfg) or ""


def _loops(entry: os.DirEntry, folder: str) -> bool:
    """Whether ``entry`` of ``folder`` is a link that cannot be followed for its loop of links, or a folder
    link to ``folder`` itself or a folder above it."""
    if not entry.is_symlink():
        return False
    try:
        if not entry.is_dir():
            return False
    except OSError as e:
        return e.errno == errno.ELOOP
    target, here = os.path.realpath(entry.path), os.path.realpath(folder)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def _subdirs(path: str) -> list[str]:
    """The folders in ``path`` (not hidden), sorted; link loops skipped with a warning."""
    names = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if _loops(e, path):
                if e.path not in _skipped_loops:
                    _skipped_loops.add(e.path)
                    log.warning("folder dataset: skipping %s, a symbolic link that loops", e.path)
            elif e.is_dir():
                names.append(e.name)
    return sorted(names)


def _is_image(entry: os.DirEntry) -> bool:
    """An image by its extension: a file, a link to one, or a link whose target cannot be told (a loop of
    links), which is read, and fails, like any unreadable file (``data.on_corrupt``)."""
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        return entry.is_file()
    except OSError:
        return True


def _folder_classes(data_cfg: Any, split: str) -> list[str]:
    """Class names (sorted): the class folders of the train split, else of ``split``."""
    root = _folder_root(data_cfg)
    for s in (field(data_cfg, "train_split"), split):
        d = os.path.join(root, s)
        if os.path.isdir(d):
            classes = _subdirs(d)
            if classes:
                return classes
    raise DataError(f"folder dataset {root}: no class folders under {os.path.join(root, split)}")


def list_folder(data_cfg: Any, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(sorted file paths, int64 labels, class names) of ``root/<split>/<class>/*.{jpg,jpeg,png}``."""
    root = _folder_root(data_cfg)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(
            f"folder dataset {root}: split folder {split_dir} does not exist "
            f"({split_field(data_cfg, split)}={split!r})"
        )
    classes = _folder_classes(data_cfg, split)
    label_of = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for cname in _subdirs(split_dir):
        if cname not in label_of:
            raise DataError(
                f"folder dataset {root}: class folder {os.path.join(split_dir, cname)} is not one of the "
                f"{len(classes)} classes found in the train split"
            )
        cdir = os.path.join(split_dir, cname)
        with os.scandir(cdir) as it:
            files = sorted(e.name for e in it if _is_image(e))
        paths.extend(os.path.join(cdir, f) for f in files)
        labels.extend([label_of[cname]] * len(files))
    if not paths:
        raise DataError(f"folder dataset {root}: no .jpg/.jpeg/.png images in {split_dir}/<class>/")
    return paths, np.asarray(labels, np.int64), classes


def folder_description(data_cfg: Any, split: str) -> str:
    return f"folder dataset {os.path.join(_folder_root(data_cfg), split)}"


def folder_source(data_cfg: Any, split: str, process_index: int = 0, process_count: int = 1) -> Source:
    """Every ``process_count``-th file of a folder split from ``process_index`` on (every class on every
    process, since the list is sorted by class)."""
    paths, labels, _ = list_folder(data_cfg, split)
    usable = len(paths) // process_count * process_count
    paths = paths[process_index:usable:process_count]
    return Source(
        description=folder_description(data_cfg, split),
        num_examples=len(paths),
        from_files=True,
        # As bytes: a file name need not be UTF-8 (os.scandir escapes the bytes it cannot decode).
        items=tf.constant(np.asarray([os.fsencode(p) for p in paths], dtype=object), tf.string),
        labels=tf.constant(labels[process_index:usable:process_count], tf.int64),
        id_start=process_index,
        id_stride=process_count,
        fallible=True,
        on_corrupt=field(data_cfg, "on_corrupt"),
    )


@register
class Folder(Format):
    """``config.data.name='folder'``; ``config.data.data_dir`` is the root of the splits."""

    name = FOLDER

    def handles(self, data_cfg: Any) -> bool:
        return field(data_cfg, "name") == self.name

    def validate(self, data_cfg: Any) -> None:
        root = field(data_cfg, "data_dir")
        if root is None or not str(root).strip():
            raise ConfigError(
                "config.data.data_dir: required when config.data.name='folder' "
                "(the root holding <split>/<class>/*.jpg|jpeg|png)"
            )
        if not os.path.isdir(os.path.expanduser(str(root))):
            raise ConfigError(f"config.data.data_dir: folder dataset root {str(root)!r} is not a directory")

    def info(self, data_cfg: Any) -> DatasetInfo:
        root = _folder_root(data_cfg)
        splits = [s for s in _subdirs(root) if _subdirs(os.path.join(root, s))]
        wanted = [field(data_cfg, "train_split"), field(data_cfg, "eval_split")]
        if not any(s in splits for s in wanted):
            raise DataError(
                f"folder dataset {root}: neither {wanted[0]!r} nor {wanted[1]!r} exists as <split>/<class>/"
            )
        classes: list[str] = []
        counts = {}
        for split in splits:
            paths, _, classes = list_folder(data_cfg, split)
            counts[split] = len(paths)
        return DatasetInfo(
            name=field(data_cfg, "name"),
            num_classes=len(classes),
            num_examples=counts,
            class_names=tuple(classes),
        )

    def train_source(
        self, data_cfg: Any, local_batch: int, global_batch: int, process_index: int, process_count: int
    ) -> Source:
        source = folder_source(data_cfg, field(data_cfg, "train_split"), process_index, process_count)
        if source.num_examples < local_batch:
            raise DataError(
                too_small(source.description, source.num_examples, local_batch, global_batch, process_count)
            )
        return source

    def eval_source(self, data_cfg: Any, split: str) -> Source:
        return folder_source(data_cfg, split)

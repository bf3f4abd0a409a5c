"""A new input format is one file: ``data/formats/toy.py`` (random images made on the fly), added to a copy of
the package and nothing else edited, is picked by ``--config.data.format=toy`` and trains through the public
command line, validated once; an unknown ``data.format`` is a one-line config error listing the registered
formats (exit status 2)."""

import json
import os
import subprocess

import jax

from tests.helpers import make_teacher, package_with_one_more_file, tiny_cli

TOY_FORMAT = '''
"""A toy input format: seeded random 32px images and labels, made in memory; only chosen by
``config.data.format='toy'`` (it does not override ``handles``)."""

import sys

import numpy as np
import tensorflow as tf

from hybrid_distill_jax.data.common import DatasetInfo, Source, field
from hybrid_distill_jax.data.formats.base import Format, register

CLASSES = 4
COUNTS = {"train": 64, "test": 16}


def _split(split):
    rng = np.random.default_rng(sorted(COUNTS).index(split))
    images = rng.integers(0, 256, (COUNTS[split], 32, 32, 3), np.uint8)
    encoded = tf.stack([tf.io.encode_png(image) for image in images])
    return encoded, tf.constant(np.arange(COUNTS[split]) % CLASSES, tf.int64)


@register
class Toy(Format):
    name = "toy"

    def validate(self, data_cfg):
        print("toy format: config.data checked", file=sys.stderr, flush=True)

    def info(self, data_cfg):
        return DatasetInfo(name="toy", num_classes=CLASSES, num_examples=dict(COUNTS))

    def train_source(self, data_cfg, local_batch, global_batch, process_index, process_count):
        items, labels = _split(field(data_cfg, "train_split"))
        usable = len(items) // process_count * process_count
        print(f"toy format: training on {usable} generated images", file=sys.stderr, flush=True)
        return Source(
            description="toy images",
            num_examples=usable // process_count,
            from_files=False,
            items=items[process_index:usable:process_count],
            labels=labels[process_index:usable:process_count],
            id_start=process_index,
            id_stride=process_count,
        )

    def eval_source(self, data_cfg, split):
        items, labels = _split(split)
        records = tf.data.Dataset.from_tensor_slices((items, labels))
        return Source(f"toy split {split}", COUNTS[split], from_files=False, records=records)
'''


def test_a_format_in_one_new_file_trains_through_the_cli(tmp_path, tfds_dir):
    teachers = [make_teacher(tmp_path / "deit", seed=1), make_teacher(tmp_path / "mae", seed=2)]
    env = package_with_one_more_file(tmp_path, "data/formats/toy.py", TOY_FORMAT)
    # The test session's compile cache: the toy batches have the shapes of every tiny run's.
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    workdir = tmp_path / "run"
    overrides = ["--config.data.format=toy", "--config.total_steps=2", "--config.checkpoint_every=0"]
    command = [*tiny_cli(workdir, tfds_dir, teachers), *overrides]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy format: training on 64 generated images" in proc.stderr, proc.stderr[-3000:]
    # config.data is validated once in a run (config_lib.validate), not again by the data entry points.
    assert proc.stderr.count("toy format: config.data checked") == 1, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps and max(steps) == 2


def test_an_unknown_format_is_one_line_naming_data_format(tmp_path, tfds_dir, capsys):
    """The command line's entry point in this process (the override itself is parsed by the run above)."""
    from hybrid_distill_jax.main import run_config
    from tests import tiny_config

    config = tiny_config.get_config()
    config.data.data_dir, config.data.format = tfds_dir, "nope"
    assert run_config(config, str(tmp_path / "run")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: config.data.format: unknown format 'nope'; expected '' (detected from config.data.name) "
        "or one of ['embedded_fashion_mnist', 'folder', 'prepared', 'tfds']"
    ]
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written

"""Student EMA (``config.ema``): the train state's fp32 average of the parameters against a numpy
recurrence, sharded like them, exported beside the online weights and evaluated with them."""

import json
import os

import flax.serialization
import jax
import numpy as np
import pytest

from hybrid_distill_jax.parallel import sharding
from tests.helpers import make_teacher, run_cli, tiny_cli

DECAY, WARMUP = 0.9, 2
EMA_FLAGS = (f"--config.ema.decay={DECAY}", f"--config.ema.warmup_steps={WARMUP}", "--config.ema.export=both")
# a small end-of-run evaluation, to see both sets of weights reported
EVAL_FLAGS = (
    "--config.eval.at_end=True",
    "--config.eval.max_train=64",
    "--config.eval.max_test=32",
    "--config.eval.linear_epochs=1",
)


def test_ema_follows_the_numpy_recurrence_on_one_device_and_under_fsdp(tmp_path, tfds_dir):
    from hybrid_distill_jax.train import Trainer
    from tests.integration.test_sharding import (
        assert_same,
        equivalence_config,
        fixed_batches,
        flat,
        gathered_params,
        run_fixed_steps,
    )

    averages = {}
    layouts = (("one", dict(data=1, num_devices=1), "replicated"), ("fsdp", dict(data=2, fsdp=4), "fsdp"))
    for name, mesh, strategy in layouts:
        c = equivalence_config(tmp_path, tfds_dir, mesh, strategy)
        c.ema.update(dict(decay=DECAY, warmup_steps=WARMUP))
        trainer = Trainer(c, str(tmp_path / name))
        state = trainer._init_state(jax.random.key(c.seed))
        expected = {k: np.asarray(v, np.float64) for k, v in gathered_params(state).items()}
        for step, batch in enumerate(fixed_batches(3), start=1):
            _, state = run_fixed_steps(trainer, [batch], state)
            d = DECAY * min(1.0, step / WARMUP)
            online = gathered_params(state)
            expected = {k: d * expected[k] + (1 - d) * np.asarray(online[k], np.float64) for k in expected}
        averages[name] = flat(sharding.to_host(state["ema"]))
        assert averages[name].keys() == expected.keys()
        for k, v in averages[name].items():
            assert v.dtype == np.float32, k
            np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")
        assert any(not np.allclose(averages[name][k], online[k]) for k in online)  # it lags behind them
        fc1 = lambda tree: tree["student"]["block1"]["mlp"]["fc1"]["kernel"]  # noqa: E731
        assert fc1(state["ema"]).sharding.spec == fc1(state["params"]).sharding.spec
    assert_same(averages["fsdp"], averages["one"])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema_teachers")
    return make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)


def _cli(workdir, tfds_dir, teachers, *extra):
    return [*tiny_cli(workdir, tfds_dir, teachers), *EMA_FLAGS, *extra]


def _params(directory):
    with open(os.path.join(directory, "params.msgpack"), "rb") as f:
        return jax.tree.leaves(flax.serialization.msgpack_restore(f.read()))


def test_ema_run_exports_both_and_reports_both(tmp_path, tfds_dir, teachers):
    """(Their bit-identical resume across SIGKILLs, EMA weights and export_online included, is
    tests/integration/test_agglomerative.py's, in a run with every agglomerative option on.)"""
    reference = tmp_path / "reference"
    run_cli(_cli(reference, tfds_dir, teachers, *EVAL_FLAGS))
    ema, online = _params(reference / "export"), _params(reference / "export_online")
    assert len(ema) == len(online) and any(not np.array_equal(a, b) for a, b in zip(ema, online, strict=True))
    with open(reference / "eval.json") as f:
        summary = json.load(f)
    probes = [k for k in summary if not k.startswith("ema_")]
    assert probes and all(f"ema_{k}" in summary for k in probes), summary

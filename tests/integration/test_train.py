import os

import jax
import numpy as np
import pytest

from hybrid_distill_jax.config_lib import base_config
from hybrid_distill_jax.train import Trainer, metrics, train
from tests.helpers import ARCH, tiny_common, tiny_distill_config


def test_step_compiles_once_per_masking_stage(tmp_path, tfds_dir):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=6, batch=8)
    c.masking.stage_starts = (0.0, 0.34, 0.67)
    c.masking.stage_ratios = (0.0, 0.25, 0.5)
    result = train(c, str(tmp_path / "run"))
    assert result.compiles == 3
    keeps = [m["keep"] for m in metrics.read_metrics(str(tmp_path / "run"))]
    assert keeps == [16, 12, 8]  # 4x4 patches: all, 75%, 50%


@pytest.mark.parametrize("variant", ["hybrid", "fd_only", "relation_only", "random_mask", "over_depth"])
def test_objective_variants_run_and_log_their_terms(tmp_path, tfds_dir, variant):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=2, batch=8)
    c.log_every = 1
    c.masking.stage_ratios = (0.5, 0.5, 0.5)
    if variant == "fd_only":
        c.terms.relation.weight = 0.0
    elif variant == "relation_only":
        c.terms.feature.weight = 0.0
    elif variant == "random_mask":
        c.masking.selection = "random"
        c.masking.score_teacher = ""
    elif variant == "over_depth":
        c.masking.mode = "over_depth"
        c.masking.drop_layers = (1,)
        c.masking.drop_ratios = (0.5,)
    train(c, str(tmp_path / "run"))
    logged = metrics.read_metrics(str(tmp_path / "run"))[-1]
    assert ("feature_loss" in logged) == (variant != "relation_only")
    assert ("relation_loss" in logged) == (variant not in ("fd_only",))
    assert np.isfinite(logged["loss"])


def test_distill_loss_falls_on_embedded_data(tmp_path, tfds_dir):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=40, batch=32)
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 3
    c.masking.stage_ratios = (0.25, 0.25, 0.25)
    c.log_every = 5
    train(c, str(tmp_path / "run"))
    losses = [m["loss"] for m in metrics.read_metrics(str(tmp_path / "run"))]
    assert losses[-1] < 0.7 * losses[0], losses


def test_supervised_and_mae_modes_learn(tmp_path, tfds_dir):
    sup = tiny_common(base_config("supervised"), tfds_dir, steps=30, batch=32)
    sup.model.update(ARCH)
    sup.optim.lr = 3e-3
    sup.log_every = 5
    sup.eval.at_end = True
    sup.eval.max_train = 512
    sup.eval.max_test = 256
    sup.eval.linear_epochs = 5
    result = train(sup, str(tmp_path / "sup"))
    logged = [m for m in metrics.read_metrics(str(tmp_path / "sup")) if "accuracy" in m]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert np.mean([m["accuracy"] for m in logged[-2:]]) > 0.2  # 10 classes: chance is 0.1
    assert result.summary["knn_top1"] > 30.0
    assert os.path.exists(os.path.join(result.export_dir, "model.json"))

    mae = tiny_common(base_config("mae"), tfds_dir, steps=20, batch=32)
    mae.model.update(ARCH)
    mae.mae.update(dict(decoder_width=32, decoder_depth=1, decoder_heads=2))
    mae.optim.lr = 3e-3
    mae.log_every = 5
    train(mae, str(tmp_path / "mae"))
    losses = [m["loss"] for m in metrics.read_metrics(str(tmp_path / "mae"))]
    assert losses[-1] < losses[0]


def test_checkpoint_resume_continues_at_the_right_step(tmp_path, tfds_dir):
    c = tiny_distill_config(tmp_path, tfds_dir, steps=6, batch=8)
    c.checkpoint_every = 3
    c.masking.stage_ratios = (0.25, 0.25, 0.25)
    full = train(c, str(tmp_path / "full"))

    with c.unlocked():
        c.total_steps = 6
    # Interrupted run: train to step 3 (a checkpoint), then a fresh Trainer resumes from it.
    trainer = Trainer(c, str(tmp_path / "split"))
    trainer.total_steps = 3
    first = trainer.run()
    assert first.step == 3
    resumed_trainer = Trainer(c, str(tmp_path / "split"))
    state, start = resumed_trainer.initial_state()
    assert start == 3 and int(state["step"]) == 3
    np.testing.assert_array_equal(
        jax.tree.leaves(jax.device_get(state["params"]))[0], jax.tree.leaves(first.params)[0]
    )
    resumed = resumed_trainer.run()
    assert resumed.step == 6
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

"""The target statistics in the train state (``state['stats']``) through the trainer's own step: the EMA
standardisation's moments after N steps under FSDP on 8 devices against a loop in numpy; PHI-S estimated
once, before the first step, from the stream training then reads."""

import jax
import numpy as np

from hybrid_distill_jax.parallel import sharding
from tests.integration.test_sharding import equivalence_config, fixed_batches, run_fixed_steps

END, ANNEAL = 0.05, 3


def _momentum(step):
    return END + (1 - END) * 0.5 * (1 + np.cos(np.pi * min(step / ANNEAL, 1.0)))


def test_ema_statistics_follow_a_numpy_loop_under_fsdp(tmp_path, tfds_dir):
    from hybrid_distill_jax.train import Trainer

    batches = fixed_batches(4)
    c = equivalence_config(tmp_path, tfds_dir, dict(data=2, fsdp=4), "fsdp")
    c.masking.update(dict(stage_starts=(0.0,), stage_ratios=(0.0,)))  # every patch is a target
    c.terms.feature.update(dict(target_norm="ema", ema_momentum=END, ema_anneal_steps=ANNEAL))
    trainer = Trainer(c, str(tmp_path / "fsdp"))
    _, state = run_fixed_steps(trainer, batches)
    got = sharding.to_host(state["stats"]["feature"])

    mean, sq = np.zeros(32), np.ones(32)
    for step, batch in enumerate(batches):
        teacher = trainer.task.teachers["deit"]
        tokens = teacher(trainer.frozen["deit"], batch["image"])["tokens"]  # CLS + every patch
        flat = np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1])
        m = _momentum(step)
        mean = m * flat.mean(0) + (1 - m) * mean
        sq = m * (flat**2).mean(0) + (1 - m) * sq
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["sq_mean"], sq, rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == len(batches)


def test_phi_s_is_estimated_once_from_the_first_training_batches(tmp_path, tfds_dir):
    from hybrid_distill_jax.data import train_iterator
    from hybrid_distill_jax.terms import target_norm
    from hybrid_distill_jax.train import Trainer

    c = equivalence_config(tmp_path, tfds_dir, dict(data=1, num_devices=1))
    c.terms.feature.update(dict(target_norm="phi_s", phi_s_batches=2))
    trainer = Trainer(c, str(tmp_path / "phi_s"))
    state, start = trainer.initial_state()
    assert start == 0
    stream = train_iterator(c.data, image_size=32, global_batch=c.batch_size, seed=c.seed)
    teacher = trainer.task.teachers["deit"]
    moments = [
        target_norm.centred_moments(teacher(trainer.frozen["deit"], next(stream)["image"])["tokens"])
        for _ in range(2)
    ]
    stream.close()
    expected = target_norm.phi_s_stats(jax.device_get(moments))
    got = jax.device_get(state["stats"]["feature"])
    for key in ("mean", "scale"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the eigenvectors' signs are those of the same eigh: the rotations agree
    np.testing.assert_allclose(got["rotation"], expected["rotation"], atol=1e-4)

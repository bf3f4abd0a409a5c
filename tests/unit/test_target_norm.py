"""Target normalisation with statistics (``terms.target_norm``: PHI-S, the EMA standardisation) and
loss-aware dropping, against float64 numpy.

PHI-S's defining property is checked as such: after centring, the rotation by ``H U^T`` and the division
by sqrt(mean eigenvalue), every channel has variance 1 (the diagonal of ``H diag(e) H^T`` is ``mean(e)``
because every entry of the normalised Hadamard matrix H has magnitude 1/sqrt(C)); the eigenvalues are
the teacher's divided by their mean (the transform is a rotation and one scale, so their spread stays).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.build import normalize
from hybrid_distill_jax.terms import loss_aware_keep, target_norm, term_config
from tests.unit.test_terms import B, _run, _task

# ViT widths: tiny test models, S, B, L, SO400M, H, g (EVA), DINOv2-g, G/14
WIDTHS = (16, 24, 32, 48, 64, 96, 192, 384, 768, 1024, 1152, 1280, 1408, 1536, 1664)


@pytest.mark.parametrize("width", WIDTHS)
def test_the_hadamard_matrix_of_every_width_we_ship_is_orthogonal(width):
    h = target_norm.hadamard(width)
    assert h.shape == (width, width) and set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, width * np.eye(width, dtype=np.int64))


@pytest.mark.parametrize("width", (6, 92, 100))
def test_widths_without_a_construction_have_none(width):
    assert target_norm.hadamard(width) is None


def test_phi_s_is_refused_in_one_line_for_a_width_without_a_hadamard_matrix(tmp_path):
    terms = {"feat": term_config("tokens", "odd", target_norm="phi_s")}
    message = r"terms\.feat\.target_norm='phi_s': the teacher's target width 100"
    with pytest.raises(ConfigError, match=message):
        _task(tmp_path, {"odd": dict(width=100, num_heads=4, mlp_dim=200)}, terms)


def _anisotropic(rng, n, width):
    """Samples whose channels have very different scales, correlations and a large mean."""
    mix = rng.normal(size=(width, width)) * np.geomspace(0.05, 20.0, width)
    return rng.normal(size=(n, width)) @ mix + rng.normal(scale=30.0, size=width)


@pytest.mark.parametrize("width", (48, 64))
def test_phi_s_statistics_and_transform_match_numpy(width):
    x = _anisotropic(np.random.RandomState(0), 3000, width)
    batches = np.array_split(x.astype(np.float32), 5)  # unequal batches: combined exactly in float64
    stats = target_norm.phi_s_stats([jax.device_get(target_norm.centred_moments(b)) for b in batches])

    mean, cov = x.mean(0), np.cov(x.T)
    eig = np.linalg.eigvalsh(cov)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["scale"], np.sqrt(eig.mean()), rtol=1e-5)
    rotation = np.asarray(stats["rotation"], np.float64)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(width), atol=1e-5)

    y = np.asarray(target_norm.normalize(jnp.asarray(x, jnp.float32), "phi_s", stats), np.float64)
    np.testing.assert_allclose(y, (x - mean) @ rotation.T / np.sqrt(eig.mean()), rtol=1e-4, atol=1e-4)
    cov_y = np.cov(y.T)
    np.testing.assert_allclose(np.diag(cov_y), np.ones(width), rtol=1e-4)  # every channel: variance 1
    np.testing.assert_allclose(np.linalg.eigvalsh(cov_y), eig / eig.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    # the inverse the export describes maps the targets back to the teacher's space
    back = float(stats["scale"]) * y @ rotation + np.asarray(stats["mean"], np.float64)
    np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-3)


def test_ema_statistics_follow_a_numpy_loop():
    rng = np.random.RandomState(1)
    end, anneal = 0.01, 5
    batches = [rng.normal(loc=3.0, scale=2.0, size=(4, 7, 6)).astype(np.float32) for _ in range(8)]
    stats = target_norm.init_stats("ema", 6)
    mean, sq = np.zeros(6), np.ones(6)
    for step, b in enumerate(batches):
        stats = target_norm.ema_update(
            stats, target_norm.batch_moments(jnp.asarray(b)), target_norm.ema_momentum(step, end, anneal)
        )
        m = end + (1 - end) * 0.5 * (1 + np.cos(np.pi * min(step / anneal, 1.0)))
        flat = b.reshape(-1, 6).astype(np.float64)
        mean = m * flat.mean(0) + (1 - m) * mean
        sq = m * (flat**2).mean(0) + (1 - m) * sq
    assert float(target_norm.ema_momentum(0, end, anneal)) == 1.0
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["sq_mean"], sq, rtol=1e-5)
    y = target_norm.normalize(jnp.asarray(batches[-1]), "ema", stats)
    expected = (batches[-1] - mean) / np.sqrt(sq - mean**2 + 1e-6)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_loss_aware_keep_matches_numpy():
    rng = np.random.RandomState(2)
    weighted = rng.uniform(size=(3, 64)).astype(np.float32)
    draws = rng.uniform(size=(3, 64)) < 0.5
    keep = np.asarray(loss_aware_keep(jnp.asarray(weighted), jnp.asarray(draws)))
    worst = weighted.argmax(0)
    for t in range(3):
        np.testing.assert_array_equal(keep[t], (worst == t) | draws[t])
    assert keep[worst, np.arange(64)].all()  # each example keeps its worst-served term


def _all_kept(task):
    """What the unmasked plan of ``_task`` keeps: every patch."""
    scores = {layer: jnp.ones((B, task.num_patches)) for layer in task.score_layers}
    return task.plan.select(jax.random.key(0), scores, task.stage(0, 10))


TERMS_OF_EVERY_KIND = {
    "feat": term_config("tokens", "deit", loss="mix"),
    "summary": term_config("embedding", "deit"),
    "gram": term_config("gram", "mae"),
    "relation": term_config("relations", "mae"),
}


def test_per_example_values_average_to_each_kinds_scalar(tmp_path):
    task = _task(tmp_path, {"deit": {}, "mae": {}}, TERMS_OF_EVERY_KIND)
    params, images, metrics = _run(task)
    from hybrid_distill_jax import terms

    tout = task.teacher_passes(task.frozen, images)
    out = task.student.apply(
        {"params": params["student"]},
        normalize(images, task.mean, task.std, 32),
        **task.student_request,
    )
    kept = _all_kept(task)
    for name, term in task.terms.items():
        inputs = terms.TermInputs(out, tout.get(term.cfg.teacher), kept, run_teacher=None)
        per_example = term.value(params.get("heads", {}).get(name), inputs, per_sample=True)
        assert per_example.shape == (B,), name
        np.testing.assert_allclose(float(jnp.mean(per_example)), metrics[f"{name}_loss"], rtol=1e-5)


def test_loss_aware_dropping_keeps_each_examples_worst_term_and_reduces_after_the_mask(tmp_path):
    near_always = dict(drop="loss_aware", drop_prob=0.999)  # the draws keep (nearly) nothing: see below
    terms = {
        "feat": term_config("tokens", "deit", **near_always),
        "gram": term_config("gram", "mae", weight=16.0, **near_always),  # splits the examples
        "relation": term_config("relations", "mae"),
    }
    task = _task(tmp_path, {"deit": {}, "mae": {}}, terms)
    params, images, metrics = _run(task)
    from hybrid_distill_jax import terms as term_lib

    tout = task.teacher_passes(task.frozen, images)
    out = task.student.apply(
        {"params": params["student"]}, normalize(images, task.mean, task.std, 32), **task.student_request
    )
    kept = _all_kept(task)
    per_example = {}
    for name in ("feat", "gram"):
        term = task.terms[name]
        inputs = term_lib.TermInputs(out, tout[term.cfg.teacher], kept, run_teacher=None)
        per_example[name] = np.asarray(term.value(params.get("heads", {}).get(name), inputs, per_sample=True))
    weighted = np.stack([per_example["feat"], 16.0 * per_example["gram"]])
    worst = weighted.argmax(0)
    assert set(worst) == {0, 1}, "the fixture should split the examples between the two terms"
    # With this seed no draw keeps a term: each example keeps exactly its worst one.
    for i, name in enumerate(("feat", "gram")):
        assert metrics[f"{name}_kept"] == pytest.approx(np.mean(worst == i))
        np.testing.assert_allclose(metrics[f"{name}_loss"], per_example[name].mean(), rtol=1e-5)
    expected = np.mean(weighted.max(0)) + metrics["relation_loss"]
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_a_lone_loss_aware_term_is_refused_in_one_line(tmp_path):
    terms = {
        "feat": term_config("tokens", "deit", drop="loss_aware"),
        "relation": term_config("relations", "mae"),
    }
    with pytest.raises(ConfigError, match=r"terms\.feat\.drop='loss_aware': no other active loss-aware term"):
        _task(tmp_path, {"deit": {}, "mae": {}}, terms)


def test_phi_s_estimated_from_the_teachers_outputs_matches_numpy(tmp_path):
    terms = {
        "feat": term_config("tokens", "deit", target_norm="phi_s", phi_s_batches=2),
        "summary": term_config("embedding", "mae", target_norm="phi_s", phi_s_batches=1),
    }
    task = _task(tmp_path, {"deit": {}, "mae": {}}, terms)
    assert task.estimation_batches == 2
    batches = [{"image": jax.random.uniform(jax.random.key(s), (B, 32, 32, 3))} for s in range(3)]
    stats = task.estimate_stats(task.frozen, task.init_stats(), iter(batches))

    def teacher(name, images):
        t = task.teachers[name]
        return t.model.apply({"params": task.frozen[name]}, normalize(images, t.mean, t.std, 32))

    tokens = np.concatenate(
        [np.asarray(teacher("deit", b["image"])["tokens"], np.float64).reshape(-1, 32) for b in batches[:2]]
    )
    summaries = np.asarray(teacher("mae", batches[0]["image"])["summary"], np.float64)
    for name, x in (("feat", tokens), ("summary", summaries)):
        eig = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None)
        np.testing.assert_allclose(stats[name]["mean"], x.mean(0), rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(stats[name]["scale"], np.sqrt(eig.mean()), rtol=1e-4, err_msg=name)
    # the step normalises with them
    params = task.init_params(jax.random.key(0))
    images = batches[2]["image"]
    _, with_stats = jax.jit(task.loss_fn, static_argnums=4)(
        params, task.frozen, {"image": images}, jax.random.key(5), task.stage(0, 10), stats, jnp.int32(0)
    )
    x = np.asarray(teacher("deit", images)["tokens"], np.float64)
    target = (
        (x - stats["feat"]["mean"])
        @ np.asarray(stats["feat"]["rotation"], np.float64).T
        / stats["feat"]["scale"]
    )
    student = task.student.apply({"params": params["student"]}, normalize(images, task.mean, task.std, 32))
    from tests.unit.test_terms import dense, smooth_l1

    pred = dense(params["heads"]["feat"], student["tokens"])
    np.testing.assert_allclose(float(with_stats["feat_loss"]), smooth_l1(pred, target), rtol=1e-4)
    assert with_stats["stats"] == {}  # PHI-S's statistics are fixed: nothing to update

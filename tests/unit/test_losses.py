import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_distill_jax import losses
from hybrid_distill_jax.errors import ConfigError


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kept_relation_equals_softmax_restricted_to_kept_set():
    rng = np.random.default_rng(0)
    b, h, n, d = 2, 3, 9, 4
    q = rng.normal(size=(b, n, h, d)).astype(np.float32) * 1.5
    k = rng.normal(size=(b, n, h, d)).astype(np.float32) * 1.5
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    keep = np.array([[0, 2, 3, 7], [0, 1, 5, 8]])
    gathered = jax.nn.softmax(losses.relation_logits(jnp.asarray(q), jnp.asarray(k), jnp.asarray(keep)), -1)
    full_probs = _softmax(logits.astype(np.float64))
    for bi in range(b):
        for hi in range(h):
            for qi, q in enumerate(keep[bi]):
                row = np.array([full_probs[bi, hi, q, k] for k in keep[bi]])
                np.testing.assert_allclose(np.asarray(gathered[bi, hi, qi]), row / row.sum(), atol=1e-6)


def test_relation_kl_matches_numpy_reference():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(2, 3, 5, 5)) * 2
    s = rng.normal(size=(2, 3, 5, 5)) * 2
    pt, ps = _softmax(t), _softmax(s)
    total, count = 0.0, 0
    for idx in np.ndindex(2, 3, 5):
        total += sum(pt[idx][k] * (np.log(pt[idx][k]) - np.log(ps[idx][k])) for k in range(5))
        count += 1
    ours = losses.relation_loss(jnp.asarray(t), jnp.asarray(s), "kl")
    np.testing.assert_allclose(float(ours), total / count, rtol=1e-5)
    assert float(losses.relation_loss(jnp.asarray(t), jnp.asarray(t), "kl")) == pytest.approx(0.0, abs=1e-6)
    mse = losses.relation_loss(jnp.asarray(t), jnp.asarray(s), "mse")
    np.testing.assert_allclose(float(mse), np.mean((pt - ps) ** 2), rtol=1e-5)


def test_relation_kl_in_fp32_from_bf16_inputs():
    t = jax.random.normal(jax.random.key(0), (1, 2, 4, 4), jnp.bfloat16)
    out = losses.relation_loss(t, t * 0.5, "kl")
    assert out.dtype == jnp.float32


def test_smooth_l1_matches_numpy_reference():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(3, 7, 11)) * 3, rng.normal(size=(3, 7, 11)) * 3
    beta = 2.0
    ref = []
    for p, t in zip(pred.ravel(), target.ravel()):
        d = abs(p - t)
        ref.append(0.5 * d * d / beta if d < beta else d - 0.5 * beta)
    np.testing.assert_allclose(
        float(losses.smooth_l1(jnp.asarray(pred), jnp.asarray(target), beta)), np.mean(ref), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(losses.feature_loss(jnp.asarray(pred), jnp.asarray(target), "mse")),
        np.mean((pred - target) ** 2),
        rtol=1e-5,
    )
    cos = np.sum(pred * target, -1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
    np.testing.assert_allclose(
        float(losses.feature_loss(jnp.asarray(pred), jnp.asarray(target), "cosine")), -np.mean(cos), rtol=1e-5
    )
    with pytest.raises(ConfigError, match="feature loss 'l3'"):
        losses.feature_loss(jnp.asarray(pred), jnp.asarray(target), "l3")


def test_whiten_is_parameter_free_layernorm():
    x = np.random.default_rng(3).normal(size=(2, 4, 16)) * 5 + 3
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(losses.whiten(jnp.asarray(x))), ref, atol=1e-5)


def test_cross_entropy_with_label_smoothing():
    logits = np.random.default_rng(4).normal(size=(5, 3))
    labels = np.array([0, 1, 2, 1, 0])
    logp = np.log(_softmax(logits))
    target = np.eye(3)[labels] * 0.9 + 0.1 / 3
    np.testing.assert_allclose(
        float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 3, 0.1)),
        -np.mean(np.sum(target * logp, -1)),
        rtol=1e-5,
    )

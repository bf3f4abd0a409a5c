import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_distill_jax import masking
from hybrid_distill_jax.errors import ConfigError


def test_gumbel_top_k_frequencies_follow_scores():
    # One draw of k=1 under Gumbel-top-k is a categorical sample with p = score / sum(score).
    scores = jnp.array([[0.5, 0.25, 0.15, 0.1]])
    n = 20_000
    rngs = jax.random.split(jax.random.key(0), n)
    picks = jax.vmap(lambda r: masking.select_tokens(r, scores, 1, "gumbel")[0, 0])(rngs)
    freq = np.bincount(np.asarray(picks), minlength=4) / n
    expected = np.array([0.5, 0.25, 0.15, 0.1])
    # Chi-square goodness of fit, 3 d.o.f.: 16.27 is the 0.1% critical value.
    chi2 = np.sum((freq * n - expected * n) ** 2 / (expected * n))
    assert chi2 < 16.27, (freq, chi2)


def test_gumbel_top_k_inclusion_prefers_high_scores():
    scores = jnp.linspace(0.01, 1.0, 16)[None]
    rngs = jax.random.split(jax.random.key(1), 4000)
    idx = jax.vmap(lambda r: masking.select_tokens(r, scores, 4, "gumbel")[0])(rngs)
    counts = np.bincount(np.asarray(idx).ravel(), minlength=16)
    # Inclusion frequency increases with the score (Spearman rank correlation close to 1).
    ranks = np.argsort(np.argsort(counts))
    rho = np.corrcoef(ranks, np.arange(16))[0, 1]
    assert rho > 0.95, counts
    assert counts[-1] > 3 * counts[0]


def test_topk_random_and_sorted_without_duplicates():
    scores = jax.random.uniform(jax.random.key(0), (3, 50))
    top = masking.select_tokens(jax.random.key(1), scores, 10, "topk")
    expected = np.sort(np.argsort(-np.asarray(scores), axis=1)[:, :10], axis=1)
    np.testing.assert_array_equal(np.asarray(top), expected)
    rand = np.asarray(masking.select_tokens(jax.random.key(2), scores, 10, "random"))
    for row in rand:
        assert len(set(row)) == 10 and list(row) == sorted(row)
    full = masking.select_tokens(jax.random.key(2), scores, 50, "gumbel")
    np.testing.assert_array_equal(np.asarray(full), np.tile(np.arange(50), (3, 1)))
    with pytest.raises(ConfigError):
        masking.select_tokens(jax.random.key(2), scores, 10, "nope")


def test_keep_schedule_is_piecewise_constant():
    s = masking.KeepSchedule((0.0, 0.3, 0.6), (0.0, 0.25, 0.5))
    ratios = [s.mask_ratio(step, 100) for step in range(100)]
    assert ratios[:30] == [0.0] * 30 and ratios[30:60] == [0.25] * 30 and ratios[60:] == [0.5] * 40
    assert [s.stage_start_step(i, 100) for i in range(3)] == [0, 30, 60]
    assert masking.keep_count(196, 0.5) == 98 and masking.keep_count(64, 0.25) == 48
    assert masking.keep_count(4, 0.99) == 1


@pytest.mark.parametrize(
    "starts,ratios",
    [
        ((0.0, 0.5), (0.0, 1.0)),
        ((0.0,), (-0.1,)),
        ((0.1,), (0.5,)),
        ((0.0, 0.6, 0.3), (0, 0.1, 0.2)),
        ((0.0, 0.5), (0.1,)),
    ],
)
def test_bad_schedules(starts, ratios):
    with pytest.raises(ConfigError, match="masking.stage"):
        masking.KeepSchedule(starts, ratios)


def test_nested_selection_gives_nested_subsets():
    scores = [jax.random.uniform(jax.random.key(i), (2, 32)) for i in range(3)]
    rel, ab = masking.nested_selection(jax.random.key(0), scores, (24, 16, 8), "gumbel")
    assert [a.shape for a in ab] == [(2, 24), (2, 16), (2, 8)]
    prev = np.tile(np.arange(32), (2, 1))
    for r, a in zip(rel, ab):
        np.testing.assert_array_equal(np.take_along_axis(prev, np.asarray(r), 1), np.asarray(a))
        for row_prev, row in zip(prev, np.asarray(a)):
            assert set(row) <= set(row_prev)
        prev = np.asarray(a)


def test_with_prefix_and_scores():
    idx = jnp.array([[0, 3], [1, 2]])
    np.testing.assert_array_equal(np.asarray(masking.with_prefix(idx, 2)), [[0, 1, 2, 5], [0, 1, 3, 4]])
    attn = jnp.ones((2, 3, 5)) * jnp.arange(3)[None, :, None]
    np.testing.assert_allclose(np.asarray(masking.redundancy_scores(attn)), np.ones((2, 5)))

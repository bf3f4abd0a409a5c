import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hybrid_distill_jax import masking
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.masking import over_depth, over_training


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


def test_mask_ratio_schedule_is_piecewise_constant():
    s = over_training.MaskRatioSchedule((0.0, 0.3, 0.6), (0.0, 0.25, 0.5))
    ratios = [s.mask_ratio(step, 100) for step in range(100)]
    assert ratios[:30] == [0.0] * 30 and ratios[30:60] == [0.25] * 30 and ratios[60:] == [0.5] * 40
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
        over_training.MaskRatioSchedule(starts, ratios)


def test_nested_selection_gives_nested_subsets():
    scores = [jax.random.uniform(jax.random.key(i), (2, 32)) for i in range(3)]
    rel, ab = over_depth.nested_selection(jax.random.key(0), scores, (24, 16, 8), "gumbel")
    assert [a.shape for a in ab] == [(2, 24), (2, 16), (2, 8)]
    prev = np.tile(np.arange(32), (2, 1))
    for r, a in zip(rel, ab):
        np.testing.assert_array_equal(np.take_along_axis(prev, np.asarray(r), 1), np.asarray(a))
        for row_prev, row in zip(prev, np.asarray(a)):
            assert set(row) <= set(row_prev)
        prev = np.asarray(a)


def test_redundancy_scores_average_heads():
    attn = jnp.ones((2, 3, 5)) * jnp.arange(3)[None, :, None]
    np.testing.assert_allclose(np.asarray(masking.redundancy_scores(attn)), np.ones((2, 5)))


def _cfg(**kw):
    base = dict(
        mode="over_training",
        selection="topk",
        temperature=1.0,
        stage_starts=(0.0, 0.5),
        stage_ratios=(0.0, 0.5),
        drop_layers=(1, 3),
        drop_ratios=(0.25, 0.5),
    )
    return ml_collections.ConfigDict({**base, **kw})


def test_over_training_plan_counts_and_selection():
    plan = masking.keep_plan(_cfg(), num_patches=16, depth=4)
    assert isinstance(plan, over_training.OverTrainingPlan)
    assert [plan.stage(s, 10) for s in (0, 4, 5, 9)] == [16, 16, 8, 8]
    assert plan.stage_metrics(8) == {"keep": 8}
    assert plan.score_layers(6) == (6,)
    scores = jax.random.uniform(jax.random.key(0), (2, 16))
    kept = plan.select(jax.random.key(1), {6: scores}, 8)
    expected = np.sort(np.argsort(-np.asarray(scores), axis=1)[:, :8], axis=1)
    np.testing.assert_array_equal(np.asarray(kept.input_indices), expected)
    assert kept.drop_after is None
    for layer in (1, 2, 4):
        np.testing.assert_array_equal(np.asarray(kept.patches_at(layer)), expected)
    np.testing.assert_array_equal(np.asarray(kept.final_indices), expected)


def test_over_depth_plan_nests_sets_after_each_drop():
    plan = masking.keep_plan(_cfg(mode="over_depth"), num_patches=16, depth=4)
    assert isinstance(plan, over_depth.OverDepthPlan)
    assert plan.stage(0, 10) == plan.stage(9, 10) == (12, 8)
    assert plan.stage_metrics((12, 8)) == {"keep": 8}
    assert plan.score_layers(6) == (1, 3)
    s1, s3 = (jax.random.uniform(jax.random.key(i), (2, 16)) for i in (2, 3))
    kept = plan.select(jax.random.key(1), {1: s1, 3: s3}, (12, 8))
    assert kept.input_indices is None and set(kept.drop_after) == {1, 3}
    # Independent top-k: 12 best of layer 1's scores, then 8 best (by layer 3's scores) among those.
    first = np.sort(np.argsort(-np.asarray(s1), axis=1)[:, :12], axis=1)
    second = np.stack([np.sort(row[np.argsort(-np.asarray(s3)[i, row])[:8]]) for i, row in enumerate(first)])
    np.testing.assert_array_equal(np.asarray(kept.patches_at(1)), np.tile(np.arange(16), (2, 1)))
    for layer in (2, 3):
        np.testing.assert_array_equal(np.asarray(kept.patches_at(layer)), first)
    np.testing.assert_array_equal(np.asarray(kept.patches_at(4)), second)
    np.testing.assert_array_equal(np.asarray(kept.final_indices), second)
    # drop_after holds indices relative to the previous set.
    np.testing.assert_array_equal(np.take_along_axis(first, np.asarray(kept.drop_after[3]), 1), second)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(drop_layers=(1,)), "masking.drop_layers and masking.drop_ratios"),
        (dict(drop_layers=(3, 1)), "masking.drop_layers=[3, 1]"),
        (dict(drop_layers=(1, 4)), "masking.drop_layers=[1, 4]: expected increasing layers in 1..3"),
        (dict(drop_ratios=(0.5, 0.25)), "masking.drop_ratios=[0.5, 0.25]: expected non-decreasing"),
        (dict(drop_ratios=(0.5, 1.0)), "masking.drop_ratios"),
        (dict(mode="sideways"), "masking.mode='sideways'"),
    ],
)
def test_bad_over_depth_plans(changes, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        masking.keep_plan(_cfg(**{"mode": "over_depth", **changes}), num_patches=16, depth=4)


@pytest.mark.parametrize("multiple", [8, 16, 128])
def test_token_multiple_rounds_masked_counts_down_to_hardware_friendly_lengths(multiple):
    """ViT-B/16 at 224 px (196 patches): every masked count falls to the largest K with CLS + K a multiple
    of ``multiple``, no larger than the ratio's; the unmasked stage keeps all 196 patches."""
    for ratio in (0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 0.9):
        plain = masking.keep_count(196, ratio)
        k = masking.keep_count(196, ratio, multiple)
        if ratio == 0.0:
            assert k == plain == 196
            continue
        assert 1 <= k <= plain and ((1 + k) % multiple == 0 or k == 1)
        assert k == 1 or plain - k < multiple  # the largest such K
    training_plan = masking.keep_plan(_cfg(token_multiple=8), num_patches=196, depth=12)
    assert training_plan.stages(10) == (196, 95)  # 98 -> 95: CLS + 95 = 96 tokens
    depth_plan = masking.keep_plan(_cfg(mode="over_depth", token_multiple=8), num_patches=196, depth=12)
    assert depth_plan.stage(0, 10) == (143, 95)  # 147 -> 143 and 98 -> 95, still nested

"""The ViT features of the 2026 teachers (registers, LayerScale, rotary embeddings, MAP head, no CLS) and
what the objective does with them, on tiny models: parity with timm lives in
tests/integration/test_convert_modern.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hybrid_distill_jax import masking
from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import make_vit, rope_table
from hybrid_distill_jax.teachers.frozen import resample_patches
from hybrid_distill_jax.terms.relations import without_registers

BASE = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32)
ROPE = dict(BASE, posemb="rope", num_registers=3, layer_scale_init=0.5, qkv_bias=False)
SIGLIP = dict(BASE, class_token=False, pool="map")


def _init(arch, seed=0, size=32):
    model = make_vit(arch)
    images = jax.random.normal(jax.random.key(seed + 1), (2, size, size, 3))
    params = model.init(jax.random.key(seed), images)["params"]
    return model, params, images


def test_prefix_counts_and_param_shapes():
    model, params, _ = _init(dict(BASE, num_registers=4, prefix_posemb=False, layer_scale_init=1e-5))
    assert model.num_prefix == 5 and model.posemb_prefix == 0
    assert params["reg_token"].shape == (1, 4, 32) and params["pos_embed"].shape == (1, 16, 32)
    np.testing.assert_allclose(params["block1"]["ls1"]["gamma"], 1e-5)
    siglip, sp, _ = _init(SIGLIP)
    assert siglip.num_prefix == 0 and "cls_token" not in sp and "map_head" in sp
    rope, rp, _ = _init(ROPE)
    assert "pos_embed" not in rp and rope.num_prefix == 4


@pytest.mark.parametrize("arch", [ROPE, dict(BASE, num_registers=2, prefix_posemb=False)])
def test_positions_travel_with_kept_tokens(arch):
    """Attention is permutation-equivariant once each token carries its own position: feeding every patch
    in a shuffled order (``keep_indices``), or shuffling them mid-network (``drop_after``), permutes the
    patch outputs and leaves the prefix alone. For RoPE this holds only if the rotary table is gathered
    with the tokens."""
    model, params, images = _init(arch)
    p = model.num_prefix
    full = model.apply({"params": params}, images)["tokens"]
    perm = jnp.asarray(np.stack([np.random.default_rng(s).permutation(16) for s in (0, 1)]), jnp.int32)
    shuffled = model.apply({"params": params}, images, keep_indices=perm)["tokens"]
    expect = jnp.take_along_axis(full[:, p:], perm[..., None], axis=1)
    np.testing.assert_allclose(shuffled[:, p:], expect, atol=2e-5)
    np.testing.assert_allclose(shuffled[:, :p], full[:, :p], atol=2e-5)
    mid = model.apply({"params": params}, images, drop_after={1: perm})["tokens"]
    np.testing.assert_allclose(mid[:, p:], expect, atol=2e-5)


def test_rope_table_is_resolution_relative():
    """Patch centres are normalised by the grid's own size: the middle of any odd grid has angle 0 (sin 0,
    cos 1), and the corner patches of a 2x2 and a 4x4 grid differ (the same table is not stretched)."""
    for g in (3, 5, 7):
        centre = rope_table(g, g, 16, 100.0)[(g * g) // 2]
        np.testing.assert_allclose(centre[0], 0.0, atol=1e-6)
        np.testing.assert_allclose(centre[1], 1.0, atol=1e-6)
    assert not np.allclose(rope_table(2, 2, 16, 100.0)[0], rope_table(4, 4, 16, 100.0)[0])


def test_rope_model_runs_at_another_resolution():
    model, params, _ = _init(ROPE)
    images = jax.random.normal(jax.random.key(3), (1, 48, 48, 3))
    assert model.apply({"params": params}, images)["tokens"].shape == (1, 4 + 36, 32)


def test_summary_and_map_attention():
    model, params, images = _init(SIGLIP)
    out = model.apply({"params": params}, images)
    assert out["summary"].shape == (2, 32) and out["map_attn"].shape == (2, 2, 16)
    np.testing.assert_allclose(out["map_attn"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["summary"], out["pooled"])
    deit, dp, _ = _init(dict(BASE, pool="gap"))
    out = deit.apply({"params": dp}, images)
    np.testing.assert_array_equal(out["summary"], out["tokens"][:, 0])  # the CLS, whatever pools the head


@pytest.mark.parametrize(
    "arch, words",
    [
        (dict(SIGLIP, pool="cls"), "pool='cls' reads the CLS token"),
        (dict(BASE, class_token=False, proj_dim=8, pool="gap"), "proj_dim=8 projects the CLS token"),
        (dict(BASE, posemb="rotary"), "model.posemb='rotary'"),
        (dict(BASE, pool="attn"), "model.pool='attn'"),
        (dict(ROPE, width=24, num_heads=4), "head dimension divisible by 4"),
    ],
)
def test_contradictory_architectures_are_refused(arch, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make_vit(arch)


def test_cls_attention_of_a_model_without_cls_is_refused():
    model, params, images = _init(SIGLIP)
    with pytest.raises(ConfigError, match="without a CLS token"):
        model.apply({"params": params}, images, cls_attn_layers=(1,))


def test_resample_patches_onto_the_student_grid():
    model, params, images = _init(dict(BASE, patch_size=4, num_registers=2), size=32)  # an 8x8 grid
    out = model.apply({"params": params}, images, qk_layers=(1,), hidden_layers=(2,), cls_attn_layers=(2,))
    same = resample_patches(out, model.num_prefix, 8)
    np.testing.assert_allclose(same["tokens"], out["tokens"], atol=1e-6)
    small = resample_patches(out, model.num_prefix, 4)
    assert small["tokens"].shape == (2, 3 + 16, 32) and small["hidden"][2].shape == (2, 19, 32)
    assert small["qk"][1][0].shape == (2, 19, 2, 16) and small["cls_attn"][2].shape == (2, 2, 16)
    np.testing.assert_array_equal(small["tokens"][:, :3], out["tokens"][:, :3])
    # resizing keeps a field that is constant over the grid, channel by channel
    const = dict(out, tokens=jnp.full((2, 3 + 64, 32), 2.5))
    np.testing.assert_allclose(resample_patches(const, 3, 4)["tokens"], 2.5, atol=1e-6)


def test_without_registers_keeps_cls_and_patch_rows_and_columns():
    logits = jnp.arange(2 * 1 * 6 * 6, dtype=jnp.float32).reshape(2, 1, 6, 6)
    cut = without_registers(logits, 3)  # CLS, 2 registers, 3 patches
    keep = np.array([0, 3, 4, 5])
    np.testing.assert_array_equal(cut, np.asarray(logits)[:, :, keep][:, :, :, keep])
    assert without_registers(logits, 1) is logits


def test_patch_scores_of_each_kind():
    model, params, images = _init(dict(SIGLIP, num_registers=1))
    out = model.apply({"params": params}, images, hidden_layers=(1,))
    np.testing.assert_allclose(
        masking.patch_scores("map_attention", out, 1, model.num_prefix), out["map_attn"].mean(axis=1)
    )
    norms = masking.patch_scores("token_norm", out, 1, model.num_prefix)
    np.testing.assert_allclose(norms, np.linalg.norm(np.asarray(out["hidden"][1])[:, 1:], axis=-1), rtol=1e-5)
    assert masking.score_request("token_norm", (1,)) == {"hidden_layers": (1,)}
    cfg = ml_collections.ConfigDict(dict(score_teacher="siglip", score="cls_attention"))
    with pytest.raises(ConfigError, match="has no CLS token; use masking.score='map_attention'"):
        masking.check_scorer(cfg, {"class_token": False, "pool": "map"})
    cfg.score = "map_attention"
    with pytest.raises(ConfigError, match="has no MAP head"):
        masking.check_scorer(cfg, {"class_token": True, "pool": "cls"})


def test_register_count_disagreeing_with_model_json_is_one_line(tmp_path):
    model, params, _ = _init(dict(BASE, num_registers=4))
    model_io.save_model(str(tmp_path), model.clone(num_registers=2), params)
    with pytest.raises(CheckpointError) as e:
        model_io.load_model(str(tmp_path), field="teachers.dino.checkpoint")
    assert "\n" not in str(e.value)
    assert "says num_registers=2, params.msgpack holds 4 register tokens" in str(e.value)

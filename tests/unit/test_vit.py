import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.build import attention_fields
from hybrid_distill_jax.models.vit import decode_variant, make_vit, resample_posemb, sincos_posemb_2d


def _count(model, size=224):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    "variant,expected",
    [
        ("Ti/16", 5_717_416),
        ("S/16", 22_050_664),
        ("B/16", 86_567_656),
        ("L/16", 304_326_632),
        ("H/14", 632_045_800),
    ],
)
def test_parameter_counts_match_published_sizes(variant, expected):
    # timm's vit_*_patch*_224 with a 1000-class head.
    assert _count(make_vit({"variant": variant, "num_classes": 1000})) == expected


def test_deit_distilled_and_clip_counts():
    # timm deit_base_distilled_patch16_224 counts both heads (87,338,192); ours has one head + dist token.
    deit = _count(make_vit({"variant": "B/16", "num_classes": 1000, "dist_token": True}))
    assert deit == 87_338_192 - (768 * 1000 + 1000)
    # OpenAI CLIP ViT-B/16 visual tower: 86,192,640 parameters (no patch bias, ln_pre, proj to 512).
    clip = _count(
        make_vit(
            {
                "variant": "B/16",
                "ln_pre": True,
                "patch_bias": False,
                "act": "quick_gelu",
                "proj_dim": 512,
                "norm_eps": 1e-5,
            }
        )
    )
    assert clip == 86_192_640


def _tiny(**kw):
    return make_vit({"variant": "nano/4", "image_size": 32, **kw})


def test_all_tokens_in_identity_order_equals_plain_forward():
    model = _tiny(num_classes=5)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    plain = model.apply(params, x)
    idx = jnp.broadcast_to(jnp.arange(64), (3, 64))
    kept = model.apply(params, x, keep_indices=idx)
    np.testing.assert_array_equal(np.asarray(plain["tokens"]), np.asarray(kept["tokens"]))
    np.testing.assert_array_equal(np.asarray(plain["logits"]), np.asarray(kept["logits"]))


def test_kept_subset_equals_blocks_on_tokens_embedded_and_gathered_by_hand():
    """keep_indices == numpy patch embedding + position embedding, gathered by hand, then the blocks."""
    from hybrid_distill_jax.models.vit import Block

    model = _tiny()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    idx = np.array([[0, 5, 9, 63], [1, 2, 3, 40]])
    out = model.apply({"params": params}, x, keep_indices=jnp.asarray(idx), attn_layers=(2,))
    assert out["attn_logits"][2].shape == (2, model.num_heads, 5, 5)

    p, w = model.patch_size, model.width
    patches = np.asarray(x).reshape(2, 8, p, 8, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 64, p * p * 3)
    kernel = np.asarray(params["patch_embed"]["kernel"]).reshape(p * p * 3, w)
    pos = np.asarray(params["pos_embed"])[0]
    tokens = patches @ kernel + np.asarray(params["patch_embed"]["bias"]) + pos[1:]
    kept = np.stack([tokens[i, idx[i]] for i in range(2)])
    cls = np.broadcast_to(np.asarray(params["cls_token"])[0] + pos[:1], (2, 1, w))
    seq = jnp.asarray(np.concatenate([cls, kept], axis=1))
    for layer in range(1, model.depth + 1):
        block = Block(model.num_heads, model.mlp_dim, model.act, model.qkv_bias, model.norm_eps)
        seq, _ = block.apply({"params": params[f"block{layer}"]}, seq)
    seq = np.asarray(seq)
    mean, var = seq.mean(-1, keepdims=True), seq.var(-1, keepdims=True)
    norm = params["norm"]
    expected = (seq - mean) / np.sqrt(var + model.norm_eps) * np.asarray(norm["scale"]) + np.asarray(
        norm["bias"]
    )
    np.testing.assert_allclose(np.asarray(out["tokens"]), expected, atol=2e-5)


def test_permuting_kept_tokens_permutes_outputs():
    model = _tiny()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    idx = jnp.array([[0, 5, 9, 63], [1, 2, 3, 40]])
    out = model.apply(params, x, keep_indices=idx)
    perm = jnp.array([3, 1, 0, 2])
    out_p = model.apply(params, x, keep_indices=idx[:, perm])
    np.testing.assert_allclose(
        np.asarray(out["tokens"][:, 1:][:, perm]), np.asarray(out_p["tokens"][:, 1:]), atol=1e-5
    )


def test_attention_outputs_are_consistent():
    model = _tiny()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    fused = model.apply(params, x, cls_attn_layers=(4,))
    explicit = model.apply(params, x, attn_layers=(1, 4), cls_attn_layers=(4,))
    np.testing.assert_allclose(np.asarray(fused["tokens"]), np.asarray(explicit["tokens"]), atol=1e-5)
    assert set(explicit["attn_logits"]) == {1, 4} and fused["attn_logits"] == {}
    probs = jax.nn.softmax(explicit["attn_logits"][4], axis=-1)
    np.testing.assert_allclose(np.asarray(probs[:, :, 0, 1:]), np.asarray(fused["cls_attn"][4]), atol=1e-6)
    assert explicit["attn_logits"][1].dtype == jnp.float32


def test_bf16_compute_keeps_fp32_attention_and_params():
    model = _tiny(dtype=jnp.bfloat16, num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = model.apply(params, x, attn_layers=(1,), cls_attn_layers=(4,))
    assert out["tokens"].dtype == jnp.bfloat16
    assert out["attn_logits"][1].dtype == jnp.float32 and out["cls_attn"][4].dtype == jnp.float32


def test_remat_and_drop_path_options():
    model, remat = _tiny(drop_path=0.5), _tiny(drop_path=0.5, remat_policy="full")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        np.asarray(model.apply(params, x)["tokens"]), np.asarray(remat.apply(params, x)["tokens"]), atol=1e-5
    )
    a = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})["tokens"]
    b = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(3)})["tokens"]
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_posemb_resampling_for_another_grid():
    model = _tiny()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    out = model.apply(params, jnp.zeros((2, 48, 48, 3)))  # 12x12 grid from an 8x8 table
    assert out["tokens"].shape == (2, 1 + 144, 64)
    pe = params["params"]["pos_embed"]
    same = resample_posemb(pe, 1, 8)
    assert same is pe
    up = resample_posemb(pe, 1, 16)
    assert up.shape == (1, 1 + 256, 64)
    np.testing.assert_array_equal(np.asarray(up[:, :1]), np.asarray(pe[:, :1]))


def test_clip_style_options_and_sincos():
    model = _tiny(ln_pre=True, act="quick_gelu", proj_dim=16, dist_token=True, posemb="sincos2d")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    out = model.apply(params, x, cls_attn_layers=(4,))
    assert out["embedding"].shape == (2, 16)
    assert out["tokens"].shape == (2, 2 + 64, 64)
    assert out["cls_attn"][4].shape == (2, 4, 64)
    np.testing.assert_allclose(np.asarray(params["params"]["pos_embed"]), sincos_posemb_2d(8, 64, 2))


def test_bad_variant_and_layer_requests():
    with pytest.raises(ConfigError, match="variant"):
        decode_variant("X/16")
    model = _tiny()
    x = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match="layer 5"):
        model.apply(params, x, attn_layers=(5,))


def test_attention_implementation_switch_keeps_outputs():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = _tiny().init(jax.random.key(0), x)
    default = _tiny().apply(params, x)["tokens"]
    xla = _tiny(attn_impl="xla").apply(params, x)["tokens"]
    np.testing.assert_allclose(np.asarray(default), np.asarray(xla), atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_padding_the_fused_attention_keeps_outputs_and_gradients(dtype, tolerance):
    # 1 + 7 kept tokens and 1 + 5 after a drop: both padded (to 16), the padded keys masked, rows dropped
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    keep = jnp.tile(jnp.arange(0, 14, 2), (2, 1))
    drop_after = {2: jnp.tile(jnp.arange(5), (2, 1))}
    weights = jax.random.normal(jax.random.key(2), (2, 6, 64))
    params = _tiny().init(jax.random.key(0), x)

    def loss(params, multiple):
        model = _tiny(dtype=dtype, attn_impl="xla", attn_length_multiple=multiple)
        tokens = model.apply(params, x, keep_indices=keep, drop_after=drop_after)["tokens"]
        return jnp.sum(tokens.astype(jnp.float32) * weights)

    plain, plain_grads = jax.value_and_grad(loss)(params, 1)
    padded, padded_grads = jax.value_and_grad(loss)(params, 16)
    np.testing.assert_allclose(float(padded), float(plain), rtol=tolerance)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(padded_grads)):
        scale = float(jnp.max(jnp.abs(a))) or 1.0
        assert float(jnp.max(jnp.abs(a - b))) <= tolerance * scale


@pytest.mark.parametrize(
    "dtype, width, platform, trained, expected",
    [
        (jnp.bfloat16, 64, "gpu", True, ("cudnn", 2)),  # training: even token counts, by padding
        (jnp.bfloat16, 64, "gpu", False, ("cudnn", 1)),  # frozen: the forward kernel takes any length
        (jnp.float16, 64, "cuda", True, ("cudnn", 2)),
        (jnp.float32, 64, "gpu", True, (None, 1)),  # cuDNN's fused attention is bf16/fp16 only
        (jnp.bfloat16, 1152, "gpu", True, (None, 1)),  # head size 288: more than it takes
        (jnp.bfloat16, 64, "tpu", True, (None, 1)),
        (jnp.bfloat16, 64, "cpu", False, (None, 1)),
    ],
)
def test_the_fastest_attention_kernel_for_the_platform(dtype, width, platform, trained, expected):
    model = _tiny(dtype=dtype, width=width)
    fields = attention_fields(model, "", platform, trained=trained)
    assert (fields["attn_impl"], fields["attn_length_multiple"]) == expected
    # a named kernel is kept as named
    assert attention_fields(model, "xla", platform, trained=trained)["attn_impl"] == "xla"

"""fp8 teachers: ``Fp8Dot`` against a slow numpy quantise-multiply-rescale, the weight scales a loaded
teacher gets, and how far an fp8 teacher's outputs move from its bf16 self."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hybrid_distill_jax.models.vit import Fp8Dot, add_fp8_scales, make_vit


def reference_fp8_dense(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [T, D] @ w [D, M]: each row of x and each column of w scaled onto e4m3's range, rounded to e4m3,
    multiplied exactly (float64), scaled back."""
    sx = np.abs(x).max(axis=1, keepdims=True) / 448.0
    sw = np.abs(w).max(axis=0, keepdims=True) / 448.0
    xq = (x / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    wq = (w / sw).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (xq @ wq) * sx * sw


def test_fp8_dot_is_the_scaled_e4m3_product():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 48)).astype(np.float32) * rng.uniform(0.1, 10, size=(64, 1)).astype(np.float32)
    w = rng.normal(size=(48, 40)).astype(np.float32) * 0.02
    dot = Fp8Dot()
    params = dot.init(jax.random.key(0), x, w, (((1,), (0,)), ((), ())))
    out = dot.apply(params, x, w, (((1,), (0,)), ((), ())))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(params["params"]["kernel_scale"], np.abs(w).max(axis=0) / 448.0, rtol=1e-6)
    ref = reference_fp8_dense(x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    exact = x.astype(np.float64) @ w
    rel = np.linalg.norm(np.asarray(out) - exact) / np.linalg.norm(exact)
    assert 1e-3 < rel < 0.05, rel  # e4m3 keeps 3 mantissa bits: a few percent, not zero, not garbage


@pytest.fixture(scope="module")
def tiny_teacher():
    model = make_vit(dict(variant="nano/8"), image_size=32, dtype=jnp.bfloat16)
    images = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
    params = model.init(jax.random.key(0), images)["params"]
    return model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), images


def test_a_loaded_teacher_gets_one_fp32_scale_per_output_channel_of_each_block_matmul(tiny_teacher):
    model, params, _ = tiny_teacher
    fp8 = add_fp8_scales(model.clone(fp8=True), params)
    for layer in range(1, model.depth + 1):
        block = fp8[f"block{layer}"]
        for dense, shape in (
            (block["attn"]["qkv"], (3, 4, 16)),
            (block["attn"]["proj"], (64,)),
            (block["mlp"]["fc1"], (256,)),
            (block["mlp"]["fc2"], (64,)),
        ):
            scale = dense["Fp8Dot_0"]["kernel_scale"]
            assert scale.shape == shape and scale.dtype == jnp.float32
            kernel = np.asarray(dense["kernel"], np.float32)
            contract = tuple(range(kernel.ndim - len(shape)))
            np.testing.assert_allclose(scale, np.abs(kernel).max(axis=contract) / 448.0, rtol=1e-6)
    assert "Fp8Dot_0" not in fp8["patch_embed"]
    # described without weights (deviceless compiles): the same tree, shapes and dtypes
    abstract = add_fp8_scales(
        model.clone(fp8=True), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    )
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, abstract, fp8)
    assert all(jax.tree.leaves(same))


def test_fp8_teacher_tokens_and_relation_logits_stay_close_to_bf16(tiny_teacher):
    model, params, images = tiny_teacher
    fp8_model = model.clone(fp8=True)
    fp8_params = add_fp8_scales(fp8_model, params)
    ref = model.apply({"params": params}, images, attn_layers=(2,))
    out = fp8_model.apply({"params": fp8_params}, images, attn_layers=(2,))
    a, b = (np.asarray(o["tokens"], np.float32) for o in (ref, out))
    cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.98, cosine.min()  # random weights; trained teachers: docs/PERFORMANCE.md
    p, q = (jax.nn.log_softmax(o["attn_logits"][2]) for o in (ref, out))
    kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
    assert 0 < kl < 1e-2, kl

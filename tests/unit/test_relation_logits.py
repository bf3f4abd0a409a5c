"""``losses.relation_logits``: the kept block of the attention logits from queries and keys, without the
full map: the same values as gathering the full map's rows and columns, up-cast only at the end."""

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax import losses


def _inputs(dtype, b=2, h=3, n=9, d=8, k=4):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, n, h, d)), dtype)
    kk = jnp.asarray(rng.normal(size=(b, n, h, d)), dtype)
    idx = jnp.asarray(np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(b)]), jnp.int32)
    return q, kk, idx


def _full_map_gathered(q, k, idx):
    """The obvious way: every logit in float64, then numpy indexing of the kept rows and columns."""
    full = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
    i = np.asarray(idx)
    return np.stack([full[b][:, i[b]][:, :, i[b]] for b in range(full.shape[0])])


def test_equals_the_full_map_restricted_to_kept_tokens():
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-6)):
        q, k, idx = _inputs(dtype)
        out = losses.relation_logits(q, k, idx)
        assert out.dtype == jnp.float32 and out.shape == (2, 3, 4, 4)
        # bf16 operands are exact in fp32: only the fp32 accumulation differs from the float64 reference
        np.testing.assert_allclose(np.asarray(out), _full_map_gathered(q, k, idx), rtol=tol, atol=tol)


def test_no_full_map_is_formed():
    q, k, idx = _inputs(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(losses.relation_logits)(q, k, idx).jaxpr
    shapes = [v.aval.shape for e in jaxpr.eqns for v in e.outvars]
    assert (2, 3, 9, 9) not in shapes and (2, 3, 4, 4) in shapes
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert all(v.aval.dtype == jnp.bfloat16 for v in dot.invars)  # bf16 operands, fp32 result
    assert dot.outvars[0].aval.dtype == jnp.float32

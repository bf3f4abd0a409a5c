"""``losses.gather_relation`` gathers before it up-casts: same values, no full-size fp32 copy."""

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax import losses


def _inputs(b=2, h=3, n=9, k=4):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(b, h, n, n)) * 4, jnp.bfloat16)
    idx = jnp.asarray(np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(b)]), jnp.int32)
    return logits, idx


def test_equals_casting_first_and_numpy_indexing():
    logits, idx = _inputs()
    out = losses.gather_relation(logits, idx)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 4, 4)
    full = np.asarray(logits.astype(jnp.float32))
    i = np.asarray(idx)
    by_hand = np.stack([full[b][:, i[b]][:, :, i[b]] for b in range(full.shape[0])])
    np.testing.assert_array_equal(np.asarray(out), by_hand)  # exact: casting and gathering commute


def test_only_the_kept_block_is_up_cast():
    logits, idx = _inputs()
    jaxpr = jax.make_jaxpr(losses.gather_relation)(logits, idx).jaxpr
    casts = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"]
    to_f32 = [e for e in casts if e.outvars[0].aval.dtype == jnp.float32]
    assert to_f32 and all(e.invars[0].aval.shape == (2, 3, 4, 4) for e in to_f32)
    assert not any(
        e.outvars[0].aval.dtype == jnp.float32 and e.outvars[0].aval.shape == logits.shape for e in jaxpr.eqns
    )

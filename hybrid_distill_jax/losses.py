"""Pure loss functions of the Hybrid Distill objective; every reduction runs in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_distill_jax.errors import ConfigError

FEATURE_LOSSES = ("smooth_l1", "mse", "cosine", "mix")
RELATION_LOSSES = ("kl", "mse")


def mean(x: jax.Array, per_sample: bool = False) -> jax.Array:
    """The mean over every element, or with ``per_sample`` over all but the leading (batch) axis: [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim))) if per_sample else jnp.mean(x)


def whiten(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free LayerNorm over channels (FD/MaskAlign target whitening)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float = 2.0, per_sample: bool = False) -> jax.Array:
    """Huber-style SmoothL1 (PyTorch's definition), mean over every element (``per_sample``: per example)."""
    diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return mean(jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta), per_sample)


def feature_loss(
    pred: jax.Array,
    target: jax.Array,
    kind: str = "smooth_l1",
    beta: float = 2.0,
    mix: tuple[float, float] = (0.5, 0.5),
    per_sample: bool = False,
) -> jax.Array:
    """Regression of the student's projected tokens onto the (normalised) teacher tokens, [B, N, C] (or
    one vector per image, [B, C]). 'cosine' is minus the mean cosine similarity; 'mix' is
    ``mix[0] * cosine + mix[1] * smooth_l1`` (DUNE's 0.5 / 0.5, RADIO's 0.9 / 0.1 on features).
    ``per_sample``: one value per example, [B]."""
    if kind == "smooth_l1":
        return smooth_l1(pred, target, beta, per_sample)
    if kind == "mix":
        cosine = feature_loss(pred, target, "cosine", per_sample=per_sample)
        return mix[0] * cosine + mix[1] * smooth_l1(pred, target, beta, per_sample)
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    if kind == "mse":
        return mean((pred - target) ** 2, per_sample)
    if kind == "cosine":
        cos = jnp.sum(pred * target, -1) / (
            jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1) + 1e-8
        )
        return -mean(cos, per_sample)
    raise ConfigError(f"feature loss {kind!r}: expected one of {FEATURE_LOSSES}")


def cosine_gram(x: jax.Array) -> jax.Array:
    """The cosine similarities among a set of tokens: x [B, K, C] -> fp32 [B, K, K]."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
    return jnp.einsum("bqc,bkc->bqk", x, x)


def gram_loss(student: jax.Array, teacher: jax.Array, per_sample: bool = False) -> jax.Array:
    """DINOv3's Gram loss between two models: the mean squared difference of the cosine-similarity
    matrices of the same K tokens, [B, K, Cs] and [B, K, Ct] (the widths may differ)."""
    return mean((cosine_gram(student) - cosine_gram(teacher)) ** 2, per_sample)


def relation_logits(q: jax.Array, k: jax.Array, token_indices: jax.Array) -> jax.Array:
    """The attention logits among kept tokens [B, K] (rows and columns): fp32 [B, H, K, K].

    ``q`` (already scaled by 1/sqrt(Dh)) and ``k`` are a block's [B, N, H, Dh] queries and keys. Only the
    kept rows are gathered and multiplied, in their own dtype with fp32 accumulation: the same values as
    the full [B, H, N, N] map restricted to those rows and columns, without ever forming that map.
    """
    rows = token_indices[:, :, None, None]
    q_kept = jnp.take_along_axis(q, rows, axis=1)
    k_kept = jnp.take_along_axis(k, rows, axis=1)
    return jnp.einsum("bqhd,bkhd->bhqk", q_kept, k_kept, preferred_element_type=jnp.float32)


def relation_loss(
    teacher_logits: jax.Array, student_logits: jax.Array, kind: str = "kl", per_sample: bool = False
) -> jax.Array:
    """Per query row: KL(softmax(teacher) || softmax(student)) over keys; mean over batch, heads and rows
    (``per_sample``: over heads and rows, [B]).

    Both logit maps cover the same (kept) token set, so the softmax over kept keys equals the full
    attention restricted to the kept set and renormalised.
    """
    t = teacher_logits.astype(jnp.float32)
    s = student_logits.astype(jnp.float32)
    if kind == "kl":
        log_pt = jax.nn.log_softmax(t, axis=-1)
        log_ps = jax.nn.log_softmax(s, axis=-1)
        return mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1), per_sample)
    if kind == "mse":
        return mean((jax.nn.softmax(t, axis=-1) - jax.nn.softmax(s, axis=-1)) ** 2, per_sample)
    raise ConfigError(f"relation loss {kind!r}: expected one of {RELATION_LOSSES}")


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0):
    """Softmax cross-entropy with optional label smoothing, mean over the batch."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits.astype(jnp.float32), -1), -1))

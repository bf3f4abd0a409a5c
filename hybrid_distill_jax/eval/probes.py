"""Frozen-feature probes: weighted k-NN and a linear probe on feature arrays.

Everything here is model-agnostic: it reads [N, D] features and labels (``eval.features`` makes them).
All evaluation math runs in float32 with ``Precision.HIGHEST`` matmuls, so accelerators do not
silently drop to bf16/tf32 passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_distill_jax.errors import DataError

_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize
_BN_EPS = 1e-6  # MAE's linear-probe BatchNorm eps
_BN_MOMENTUM = 0.9  # flax convention; equals torch momentum=0.1


# ----------------------------------------------------------------------------------------------
# Weighted k-NN (DINO / InstDisc)
# ----------------------------------------------------------------------------------------------


def _check_feats_labels(feats, labels, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
        raise DataError(
            f"{name}: need non-empty features [N, D] and labels [N], got {feats.shape}, {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{name}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return feats, labels


@functools.partial(jax.jit, static_argnames=("chunk",))
def _prep_train(train, labels, *, chunk: int):
    """L2-normalise and pad the train set into [num_chunks, chunk, ...] blocks for ``lax.scan``."""
    train = train / jnp.maximum(jnp.linalg.norm(train, axis=1, keepdims=True), _NORM_EPS)
    n, d = train.shape
    pad = -n % chunk
    valid = jnp.arange(n + pad) < n
    train = jnp.pad(train, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    labels = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
    return train, labels, valid.reshape(-1, chunk)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "num_ranked", "temperature"))
def _knn_rank_batch(test, train, train_labels, valid, *, k, num_classes, num_ranked, temperature):
    """Return the ``num_ranked`` best classes for one test batch.

    Train is scanned chunk by chunk with a running top-k, so memory is [B, chunk], never
    [B, N_train]. Merging keeps the earlier (lower-index) neighbour on ties, like one global top_k.
    """
    test = test / jnp.maximum(jnp.linalg.norm(test, axis=1, keepdims=True), _NORM_EPS)
    b = test.shape[0]
    k_chunk = min(k, train.shape[1])

    def body(carry, xs):
        best_sim, best_lab = carry
        tr, lab, ok = xs
        sim = jnp.matmul(test, tr.T, precision=_HIGHEST)
        sim = jnp.where(ok[None, :], sim, -jnp.inf)
        c_sim, c_idx = jax.lax.top_k(sim, k_chunk)
        sims = jnp.concatenate([best_sim, c_sim], axis=1)
        labs = jnp.concatenate([best_lab, lab[c_idx]], axis=1)
        top_sim, top_idx = jax.lax.top_k(sims, k)
        return (top_sim, jnp.take_along_axis(labs, top_idx, axis=1)), None

    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.zeros((b, k), jnp.int32))
    (sim, lab), _ = jax.lax.scan(body, init, (train, train_labels, valid))
    weights = jnp.exp(sim / temperature)  # -inf (never with k <= N_train) would give weight 0
    votes = jnp.einsum(
        "bk,bkc->bc", weights, jax.nn.one_hot(lab, num_classes, dtype=jnp.float32), precision=_HIGHEST
    )
    # top_k breaks ties by lower class index, so the ranking is deterministic.
    return jax.lax.top_k(votes, num_ranked)[1]


def knn_predict(
    train_feats,
    train_labels,
    test_feats,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
    train_chunk_size: int = 65536,
    num_ranked: int = 5,
) -> np.ndarray:
    """Ranked class predictions int32 [N_test, min(num_ranked, num_classes)] of the weighted k-NN.

    Votes per class are sum over the k nearest (cosine) train points of exp(sim / temperature).
    Ties between classes go to the lower class index. ``k`` is clipped to the train-set size.
    """
    train_feats, train_labels = _check_feats_labels(train_feats, train_labels, "knn train", num_classes)
    test_feats = np.asarray(test_feats, np.float32)
    if test_feats.ndim != 2 or test_feats.shape[1] != train_feats.shape[1] or test_feats.shape[0] == 0:
        raise DataError(
            f"knn test features must be non-empty [N, {train_feats.shape[1]}], got {test_feats.shape}"
        )
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    k = min(int(k), n_train)
    chunk = max(min(int(train_chunk_size), n_train), k)
    bs = min(int(batch_size), n_test)
    train, labels, valid = _prep_train(jnp.asarray(train_feats), jnp.asarray(train_labels), chunk=chunk)
    rank = functools.partial(
        _knn_rank_batch,
        train=train,
        train_labels=labels,
        valid=valid,
        k=k,
        num_classes=int(num_classes),
        num_ranked=min(int(num_ranked), num_classes),
        temperature=float(temperature),
    )
    out = []
    for start in range(0, n_test, bs):
        batch = test_feats[start : start + bs]
        real = batch.shape[0]
        if real < bs:  # pad so every call has the same shape (one compile)
            batch = np.concatenate([batch, np.zeros((bs - real, batch.shape[1]), np.float32)], 0)
        out.append(rank(jnp.asarray(batch))[:real])
    return np.asarray(jnp.concatenate(out, 0), np.int32)


def knn_classify(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
    train_chunk_size: int = 65536,
) -> dict[str, float]:
    """Weighted k-NN accuracy in percent: ``top1`` and, when num_classes >= 5, ``top5``."""
    test_feats, test_labels = _check_feats_labels(test_feats, test_labels, "knn test", num_classes)
    ranked = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        batch_size=batch_size,
        train_chunk_size=train_chunk_size,
    )
    hit = ranked == test_labels[:, None]
    n = hit.shape[0]
    result = {"top1": 100.0 * int(hit[:, 0].sum()) / n}
    if num_classes >= 5:
        result["top5"] = 100.0 * int(hit[:, :5].any(axis=1).sum()) / n
    return result


# ----------------------------------------------------------------------------------------------
# Linear probe (MAE protocol: BatchNorm without affine + linear head on frozen features)
# ----------------------------------------------------------------------------------------------


def _probe_logits(params, bn_stats, x):
    x = (x - bn_stats["mean"]) * jax.lax.rsqrt(bn_stats["var"] + _BN_EPS)
    return jnp.matmul(x, params["kernel"], precision=_HIGHEST) + params["bias"]


def _make_probe_fns(opt: optax.GradientTransformation):
    """Build the jitted epoch (a ``lax.scan`` over mini-batches) and prediction functions."""

    def loss_fn(params, x, y):
        mean = x.mean(axis=0)
        var = jnp.mean(jnp.square(x - mean), axis=0)  # batch statistics while training
        logits = _probe_logits(params, {"mean": mean, "var": var}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (mean, var)

    @jax.jit
    def run_epoch(state, feats, labels, batch_idx):
        def step(state, idx):
            params, opt_state, bn = state
            x, y = feats[idx], labels[idx]
            (_, (mean, var)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            n = x.shape[0]
            bn = {
                "mean": _BN_MOMENTUM * bn["mean"] + (1 - _BN_MOMENTUM) * mean,
                # running var is unbiased, as in torch BatchNorm
                "var": _BN_MOMENTUM * bn["var"] + (1 - _BN_MOMENTUM) * var * n / max(n - 1, 1),
            }
            return (params, opt_state, bn), None

        return jax.lax.scan(step, state, batch_idx)[0]

    @jax.jit
    def predict(params, bn, x):
        return jnp.argmax(_probe_logits(params, bn, x), axis=1).astype(jnp.int32)

    return run_epoch, predict


def _probe_accuracy(predict, params, bn, feats: np.ndarray, labels: np.ndarray, batch: int = 8192) -> float:
    """Top-1 accuracy (percent) in fixed-size padded batches, so huge sets never form one logit matrix."""
    bs = min(batch, feats.shape[0])
    correct = 0
    for start in range(0, feats.shape[0], bs):
        x = feats[start : start + bs]
        real = x.shape[0]
        if real < bs:
            x = np.concatenate([x, np.zeros((bs - real, x.shape[1]), np.float32)], 0)
        pred = np.asarray(predict(params, bn, jnp.asarray(x)))[:real]
        correct += int((pred == labels[start : start + real]).sum())
    return 100.0 * correct / feats.shape[0]


def linear_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    warmup_epochs: int = 10,
) -> dict[str, float]:
    """Train BN(no affine) + linear on frozen features; return test ``top1`` and ``train_top1`` (%).

    SGD (momentum 0.9) with linear warmup then cosine decay to 0; weight decay only on the kernel.
    Each epoch is one jitted ``lax.scan`` over shuffled, fixed-size mini-batches (the last partial
    batch is dropped, as in MAE), so there is a single compile and no per-step Python overhead.
    Evaluation uses the BN running statistics.
    """
    train_feats, train_labels = _check_feats_labels(train_feats, train_labels, "probe train", num_classes)
    test_feats, test_labels = _check_feats_labels(test_feats, test_labels, "probe test", num_classes)
    if test_feats.shape[1] != train_feats.shape[1]:
        raise DataError(f"probe: train dim {train_feats.shape[1]} != test dim {test_feats.shape[1]}")
    if epochs < 1:
        raise ValueError(f"linear_probe: epochs must be >= 1, got {epochs}")
    n, d = train_feats.shape
    bs = min(int(batch_size), n)
    steps_per_epoch = n // bs
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(int(warmup_epochs), epochs - 1) * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps)
    opt = optax.chain(
        optax.add_decayed_weights(weight_decay, mask={"kernel": True, "bias": False}),
        optax.sgd(schedule, momentum=0.9),
    )
    key = jax.random.key(seed)
    params = {
        # MAE: trunc_normal_(std=0.01) kernel, zero bias
        "kernel": 0.01 * jax.random.truncated_normal(key, -2.0, 2.0, (d, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    bn = {"mean": jnp.zeros((d,), jnp.float32), "var": jnp.ones((d,), jnp.float32)}
    state = (params, opt.init(params), bn)

    run_epoch, predict = _make_probe_fns(opt)
    feats_dev, labels_dev = jnp.asarray(train_feats), jnp.asarray(train_labels)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(n)[: steps_per_epoch * bs].astype(np.int32)
        state = run_epoch(state, feats_dev, labels_dev, jnp.asarray(perm.reshape(steps_per_epoch, bs)))
    params, _, bn = state
    return {
        "top1": _probe_accuracy(predict, params, bn, test_feats, test_labels),
        "train_top1": _probe_accuracy(predict, params, bn, train_feats, train_labels),
    }

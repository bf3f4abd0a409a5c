"""Features of a model over a data split, and the frozen-feature probes run on them.

``probe_frozen_features`` is the evaluation every mode shares: it extracts pooled features of a
subset of the train split and of the eval split, then runs the k-NN and linear probes
(``eval.probes``) that ``config.eval`` switches on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax.data import eval_iterator
from hybrid_distill_jax.errors import DataError
from hybrid_distill_jax.eval import probes


def extract_features(
    feature_fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``feature_fn`` over ``batches`` and return (features f32 [N, D], labels i32 [N]).

    Rows whose ``mask`` is False (padding of the last batch) are dropped; order is kept. The next
    batch is dispatched before the previous result is copied to host, so device compute overlaps
    the transfer.
    """
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    pending = None  # (device features, labels, mask) of the batch in flight

    def _collect(item):
        out, lab, mask = item
        out = np.asarray(jnp.asarray(out, jnp.float32))
        if out.ndim != 2 or out.shape[0] != mask.shape[0]:
            raise DataError(f"feature_fn must return [B, D] with B={mask.shape[0]}, got {out.shape}")
        feats.append(out[mask])
        labels.append(lab[mask])

    for batch in batches:
        lab = np.asarray(batch["label"], np.int32).reshape(-1)
        mask = np.asarray(batch.get("mask", np.ones(lab.shape, bool)), bool).reshape(-1)
        out = feature_fn(batch["image"])
        if pending is not None:
            _collect(pending)
        pending = (out, lab, mask)
    if pending is not None:
        _collect(pending)
    if not feats:
        raise DataError("extract_features got no batches")
    return np.concatenate(feats, 0).astype(np.float32, copy=False), np.concatenate(labels, 0)


def probe_frozen_features(config, feature_fn, params, num_classes: int) -> dict[str, float]:
    """k-NN and linear probe on frozen features of the train split (subset) and the eval split."""
    ecfg, dcfg = config.eval, config.data
    if not (ecfg.knn or ecfg.linear):
        return {}
    start = time.perf_counter()
    params = jax.device_put(params)
    fn = jax.jit(lambda images: feature_fn(params, images))
    kw = dict(image_size=config.image_size, batch_size=ecfg.batch_size)
    train_x, train_y = extract_features(
        fn, eval_iterator(dcfg, dcfg.train_split, max_examples=ecfg.max_train, **kw)
    )
    test_x, test_y = extract_features(
        fn, eval_iterator(dcfg, dcfg.eval_split, max_examples=ecfg.max_test, **kw)
    )
    out = {}
    if ecfg.knn:
        knn = probes.knn_classify(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes=num_classes,
            k=ecfg.knn_k,
            temperature=ecfg.knn_temperature,
        )
        out["knn_top1"] = knn["top1"]
    if ecfg.linear:
        lin = probes.linear_probe(
            train_x, train_y, test_x, test_y, num_classes=num_classes, epochs=ecfg.linear_epochs
        )
        out["linear_top1"] = lin["top1"]
    out["eval_seconds"] = time.perf_counter() - start
    return out

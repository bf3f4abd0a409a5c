"""Tests for frozen-feature evaluation (k-NN, linear probe, feature extraction, table)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_distill_jax.eval.features import extract_features
from hybrid_distill_jax.eval.probes import knn_classify, knn_predict, linear_probe
from hybrid_distill_jax.experiments.report import format_table


def _knn_reference(train, train_labels, test, num_classes, k, temperature):
    """Slow, obviously-correct weighted k-NN: per test point, sort sims, weighted vote, stable rank."""
    train = train.astype(np.float64)
    test = test.astype(np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    ranked = []
    for x in test:
        sims = train @ x
        order = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in order:
            votes[train_labels[j]] += np.exp(sims[j] / temperature)
        ranked.append(np.argsort(-votes, kind="stable")[: min(5, num_classes)])
    return np.array(ranked)


def _accuracies(ranked, labels):
    hit = ranked == labels[:, None]
    n = len(labels)
    return 100.0 * hit[:, 0].sum() / n, 100.0 * hit[:, :5].any(axis=1).sum() / n


def test_extract_features_drops_padding_and_keeps_order():
    feature_fn = jax.jit(lambda img: img.reshape(img.shape[0], -1)[:, :3] * 2.0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 2, 2, 3)).astype(np.float32)
    labels = np.arange(10, dtype=np.int32)
    batches = []
    for start in range(0, 10, 4):  # 4, 4, 2 real rows; the last batch padded to 4
        img, lab = images[start : start + 4], labels[start : start + 4]
        real = img.shape[0]
        mask = np.arange(4) < real
        img = np.concatenate([img, np.full((4 - real, 2, 2, 3), 99.0, np.float32)])
        lab = np.concatenate([lab, np.full(4 - real, -1, np.int32)])
        batches.append({"image": img, "label": lab, "mask": mask})
    feats, labs = extract_features(feature_fn, iter(batches))
    assert feats.dtype == np.float32 and labs.dtype == np.int32
    np.testing.assert_array_equal(labs, labels)
    np.testing.assert_allclose(feats, images.reshape(10, -1)[:, :3] * 2.0, rtol=1e-6)


@pytest.mark.parametrize("num_classes,k,train_chunk", [(10, 20, 64), (3, 50, 1000), (7, 1, 33)])
def test_knn_matches_reference(num_classes, k, train_chunk):
    rng = np.random.default_rng(num_classes)
    # 150 train points: with 10 classes ~15 per class < k=20; k=50 > per-class count for 3 classes.
    train = rng.normal(size=(150, 16)).astype(np.float32)
    train_labels = rng.integers(0, num_classes, 150).astype(np.int32)
    test = rng.normal(size=(37, 16)).astype(np.float32)  # 37 is not a multiple of batch_size=8
    test_labels = rng.integers(0, num_classes, 37).astype(np.int32)

    ref = _knn_reference(train, train_labels, test, num_classes, k, 0.07)
    got = knn_predict(
        train, train_labels, test, num_classes=num_classes, k=k, batch_size=8, train_chunk_size=train_chunk
    )
    np.testing.assert_array_equal(got, ref)

    res = knn_classify(
        train,
        train_labels,
        test,
        test_labels,
        num_classes=num_classes,
        k=k,
        batch_size=8,
        train_chunk_size=train_chunk,
    )
    top1, top5 = _accuracies(ref, test_labels)
    assert res["top1"] == top1
    if num_classes >= 5:
        assert res["top5"] == top5
    else:
        assert "top5" not in res


def test_knn_separated_clusters_is_perfect():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(6, 32)) * 10
    train_labels = np.repeat(np.arange(6), 30).astype(np.int32)
    test_labels = np.tile(np.arange(6), 9).astype(np.int32)
    train = (means[train_labels] + rng.normal(size=(180, 32))).astype(np.float32)
    test = (means[test_labels] + rng.normal(size=(54, 32))).astype(np.float32)
    res = knn_classify(jnp.asarray(train), train_labels, test, test_labels, num_classes=6, batch_size=16)
    assert res == {"top1": 100.0, "top5": 100.0}


def _clusters(rng, n, means, noise=1.0):
    labels = rng.integers(0, means.shape[0], n).astype(np.int32)
    return (means[labels] + noise * rng.normal(size=(n, means.shape[1]))).astype(np.float32), labels


def test_linear_probe_separable():
    rng = np.random.default_rng(2)
    means = rng.normal(size=(10, 64)) * 1.5  # per-pair distance ~17 sigma: separable, not trivially far
    train, train_labels = _clusters(rng, 4000, means)
    test, test_labels = _clusters(rng, 1000, means)
    res = linear_probe(train, train_labels, test, test_labels, num_classes=10, epochs=10, warmup_epochs=1)
    assert res["top1"] >= 99.0 and res["train_top1"] >= 99.0


def test_linear_probe_random_labels_is_chance_on_test():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(2000, 64)).astype(np.float32)
    test = rng.normal(size=(2000, 64)).astype(np.float32)
    train_labels = rng.integers(0, 10, 2000).astype(np.int32)
    test_labels = rng.integers(0, 10, 2000).astype(np.int32)
    res = linear_probe(train, train_labels, test, test_labels, num_classes=10, epochs=10, warmup_epochs=1)
    assert 5.0 <= res["top1"] <= 15.0
    assert res["train_top1"] > res["top1"]  # it does fit the training noise somewhat


def test_format_table():
    summary = {"teacher": {"knn_top1": 71.234, "linear_top1": 80.0}, "student_ep100": {"knn_top1": 65.06}}
    table = format_table(summary)
    lines = table.splitlines()
    assert "model" in lines[0] and "knn_top1" in lines[0] and "linear_top1" in lines[0]
    teacher = next(line for line in lines if line.startswith("teacher"))
    student = next(line for line in lines if line.startswith("student_ep100"))
    assert teacher.split()[1:] == ["71.2", "80.0"]
    assert student.split()[1:] == ["65.1", "-"]

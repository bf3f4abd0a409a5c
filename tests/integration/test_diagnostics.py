"""Attention diagnostics against brute-force references, their plots, the analyze CLI, the evaluate mode
and the trainer's periodic hook.

(The linear probe reaching ~100% on a linearly separable set is covered in tests/unit/test_evaluate.py.)
"""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_distill_jax import config_lib
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.experiments import analyze, plots
from tests.helpers import make_teacher, tiny_distill_config

# ------------------------------------------------------------------------ brute-force references


def reference(logits: np.ndarray, grid: int, patch: int, num_prefix: int = 1):
    """Explicit loops over images, heads, queries and keys, straight from METHOD.md."""
    b, h, n_all, _ = logits.shape
    n = n_all - num_prefix
    dist = np.zeros((b, h))
    info = np.zeros((b, h))
    for i in range(b):
        for j in range(h):
            full = np.exp(logits[i, j] - logits[i, j].max(-1, keepdims=True))
            full = full / full.sum(-1, keepdims=True)  # post-softmax over all tokens
            a = full[num_prefix:, num_prefix:]
            a = a / a.sum(-1, keepdims=True)  # CLS row and column removed, rows renormalised
            total = 0.0
            for q in range(n):
                for k in range(n):
                    dy, dx = q // grid - k // grid, q % grid - k % grid
                    total += a[q, k] * patch * math.sqrt(dy * dy + dx * dx)
            dist[i, j] = total / n
            a = a + 1e-8
            a = a / a.sum(-1, keepdims=True)
            pk = [sum(a[q, k] / n for q in range(n)) for k in range(n)]
            mi = sum((1 / n) * a[q, k] * math.log(a[q, k] / pk[k]) for q in range(n) for k in range(n))
            hk = -sum(p * math.log(p) for p in pk)
            info[i, j] = mi / math.sqrt(math.log(n) * hk)
    return dist, info


def ours(logits, grid, patch, num_prefix=1):
    a = diagnostics.patch_attention(jnp.asarray(logits), num_prefix)
    d = diagnostics.attention_distance(a, jnp.asarray(diagnostics.patch_distances(grid, patch)))
    return np.asarray(d), np.asarray(diagnostics.nmi(a))


def with_prefix_logits(probs: np.ndarray, num_prefix: int = 1) -> np.ndarray:
    """Logits whose patch block softmaxes to ``probs`` [..., N, N] (prefix rows/cols arbitrary)."""
    *lead, n, _ = probs.shape
    out = np.random.default_rng(0).normal(size=(*lead, n + num_prefix, n + num_prefix))
    out[..., num_prefix:, num_prefix:] = np.log(np.maximum(probs, 1e-30))
    return out


@pytest.mark.parametrize("grid,patch,num_prefix", [(3, 16, 1), (4, 4, 2)])
def test_matches_brute_force_on_random_logits(grid, patch, num_prefix):
    n = grid * grid + num_prefix
    logits = np.random.default_rng(1).normal(scale=2.0, size=(2, 3, n, n))
    ref_d, ref_nmi = reference(logits, grid, patch, num_prefix)
    d, info = ours(logits, grid, patch, num_prefix)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(info, ref_nmi, rtol=1e-4, atol=1e-5)


def test_uniform_attention_has_zero_nmi():
    grid = 4
    n = grid * grid
    _, info = ours(np.zeros((1, 2, n + 1, n + 1)), grid, 8)
    np.testing.assert_allclose(info, 0.0, atol=1e-5)


def test_identity_attention_has_zero_distance_and_full_nmi():
    grid = 5
    eye = np.broadcast_to(np.eye(grid * grid), (1, 2, grid * grid, grid * grid))
    d, info = ours(with_prefix_logits(eye), grid, 16)
    np.testing.assert_allclose(d, 0.0, atol=1e-4)
    np.testing.assert_allclose(info, 1.0, atol=1e-4)


@pytest.mark.parametrize("offset", [(0, 1), (1, 0), (2, 1), (3, 3)])
def test_fixed_offset_head_has_that_distance(offset):
    """Each query attends to the patch at +offset (mirrored to -offset at the border): distance |offset|."""
    grid, patch = 6, 16
    n = grid * grid
    probs = np.zeros((n, n))
    dy, dx = offset
    for r in range(grid):
        for c in range(grid):
            ty = r + dy if r + dy < grid else r - dy
            tx = c + dx if c + dx < grid else c - dx
            probs[r * grid + c, ty * grid + tx] = 1.0
    d, _ = ours(with_prefix_logits(probs[None, None]), grid, patch)
    np.testing.assert_allclose(d, patch * math.hypot(dy, dx), rtol=1e-5)


# ------------------------------------------------------------------------------- model runner


def test_streamed_average_ignores_padding_and_matches_one_batch(tmp_path):
    directory = make_teacher(tmp_path / "m", seed=3)
    from hybrid_distill_jax.models import io as model_io

    model, params, meta = model_io.load_model(directory)
    runner = diagnostics.AttentionDiagnostics(model, meta["input"]["mean"], meta["input"]["std"])
    images = np.random.default_rng(0).uniform(size=(6, 32, 32, 3)).astype(np.float32)
    whole = runner(params, [{"image": images}])
    padded = np.concatenate([images[4:], np.zeros_like(images[:2])])
    streamed = runner(
        params,
        [{"image": images[:4]}, {"image": padded, "mask": np.array([True, True, False, False])}],
    )
    assert streamed["num_images"] == 6 and whole["layers"] == [1, 2]
    np.testing.assert_allclose(streamed["distance"], whole["distance"], rtol=1e-5)
    np.testing.assert_allclose(streamed["nmi"], whole["nmi"], rtol=1e-5)
    # Per image, then averaged: equal to the mean of the per-image references.
    out = model.apply(
        {"params": params},
        (images - np.asarray(meta["input"]["mean"])) / np.asarray(meta["input"]["std"]),
        attn_layers=(1,),
    )
    ref_d, ref_nmi = reference(np.asarray(out["attn_logits"][1], np.float64), grid=4, patch=8)
    np.testing.assert_allclose(whole["distance"][0], ref_d.mean(0), rtol=1e-4)
    np.testing.assert_allclose(whole["nmi"][0], ref_nmi.mean(0), rtol=1e-4, atol=1e-6)


def _fake_result(layers=4, heads=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layers": list(range(1, layers + 1)),
        "distance": rng.uniform(0, 10, (layers, heads)).tolist(),
        "nmi": rng.uniform(0, 1, (layers, heads)).tolist(),
    }


def test_plots_are_written(tmp_path):
    results = {"teacher": _fake_result(seed=1), "student": _fake_result(seed=2)}
    paths = plots.plot_diagnostics(results, str(tmp_path))
    bars = plots.plot_bars(
        {"a": {"knn": 80.0, "lin": 82.0}, "b": {"knn": 70.0}}, ["knn", "lin"], str(tmp_path / "b.png")
    )
    for path in [*paths.values(), bars]:
        assert os.path.getsize(path) > 5000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_analyze_cli_writes_plots_and_json(tmp_path, tfds_dir, capsys):
    a = make_teacher(tmp_path / "a" / "export", seed=1)
    b = make_teacher(tmp_path / "b", seed=2)
    out = tmp_path / "out"
    rc = analyze.main(
        [
            "--model",
            a,
            "--model",
            f"student={b}",
            "--data_dir",
            tfds_dir,
            "--num_images",
            "40",
            "--batch_size",
            "16",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    assert rc == 0
    with open(out / "diagnostics.json") as f:
        results = json.load(f)
    assert set(results) == {"a", "student"}
    assert results["a"]["num_images"] == 40 and np.shape(results["a"]["nmi"]) == (2, 2)
    for name in ("attention_distance.png", "nmi.png"):
        assert os.path.getsize(out / name) > 5000
    assert analyze.main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "model.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluate mode


def _eval_config(model_dir, data_dir):
    c = config_lib.base_config("evaluate")
    c.model_dir = str(model_dir)
    c.data.name = "embedded_fashion_mnist"
    c.data.data_dir = data_dir
    c.data.train_split, c.data.eval_split = "train", "test"
    c.eval.max_train, c.eval.max_test, c.eval.batch_size = 300, 100, 100
    c.eval.linear_epochs = 2
    c.eval.diagnostics_examples = 50
    return c


def test_evaluate_mode_writes_eval_json(tmp_path, tfds_dir):
    model_dir = make_teacher(tmp_path / "model", seed=4)
    summary = analyze.evaluate_model_dir(_eval_config(model_dir, tfds_dir), str(tmp_path / "work"))
    with open(tmp_path / "work" / "eval.json") as f:
        written = json.load(f)
    assert written == pytest.approx(summary)
    assert 10.0 < written["knn_top1"] <= 100.0 and 10.0 < written["linear_top1"] <= 100.0
    assert "diag/nmi/layer2" in written
    assert os.path.getsize(tmp_path / "work" / "nmi.png") > 5000


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model_dir", "", "model_dir"),
        ("image_size", 30, "image_size"),
        ("eval.diagnostics_every", -1, "eval.diagnostics_every"),
    ],
)
def test_evaluate_mode_bad_values(tmp_path, field, value, message):
    c = _eval_config(make_teacher(tmp_path / "m"), None)
    c.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=message) as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)


def test_diagnostics_every_must_sit_on_log_boundaries(tmp_path, tfds_dir):
    c = tiny_distill_config(tmp_path, tfds_dir)
    c.eval.diagnostics_every = 3  # log_every is 2
    with pytest.raises(ConfigError, match="eval.diagnostics_every=3 must be a multiple of log_every"):
        config_lib.validate(c)


# The trainer's periodic hook (eval.diagnostics_every) is exercised by test_study.py's smoke run.

"""A CPU run through the CLI with the agglomerative features all on, over three tiny teachers
(``tests/tiny_config.py:agglomerative``): PHI-S-normalised tokens by the cosine + SmoothL1 'mix' and a
PHI-S-normalised summary embedding (statistics estimated from the first 2 batches), EMA-standardised
tokens, a Gram term and the attention relations; three terms dropped loss-aware in one group; the
student's EMA exported beside the online weights. Every term's loss falls; SIGKILLs at two moments and a
resume end bit-identical to the uninterrupted run (EMA weights and target statistics included; PHI-S's
are restored, never re-estimated); the export carries the statistics, described in model.json, and the
EMA weights, and loads in timm."""

import os
import shutil

import flax.serialization
import jax
import numpy as np
import pytest

from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.terms import target_norm
from hybrid_distill_jax.train import metrics
from tests.helpers import assert_kill_and_resume_match, make_teacher, run_cli, timm_parity_error, tiny_cli

STEPS = 20
# the killed run's kills: once it has logged step 5 (checkpoint 2 is then complete: the save of step 4
# waited for it), then step 13; each attempt resumes the last
KILL_STEPS = (5, 13)
TERMS = ("feature", "summary", "dino_tokens", "gram", "relation")
LOSS_AWARE = ("feature", "summary", "dino_tokens")  # drop='loss_aware', one drop_group
# {term: (teacher, target_norm)} of the terms that keep statistics
NORMALIZED = dict(feature=("deit", "phi_s"), summary=("dino", "phi_s"), dino_tokens=("dino", "ema"))
STAT_FIELDS = dict(phi_s=("mean", "rotation", "scale"), ema=("mean", "sq_mean"))
ESTIMATING = "estimating target statistics"
WIDTH = 32  # the tiny teachers' width (pico), whose Hadamard matrix exists


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("agglomerative_teachers")
    names = ("deit", "mae", "dino")
    return {name: make_teacher(root / name, seed=seed) for seed, name in enumerate(names, start=1)}


def _cli(workdir, tfds_dir, teachers):
    return [*tiny_cli(workdir, tfds_dir, teachers, "agglomerative"), f"--config.total_steps={STEPS}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir, teachers):
    """The uninterrupted run, shared by every test here: (workdir, its CompletedProcess)."""
    workdir = tmp_path_factory.mktemp("agglomerative_reference")
    return workdir, run_cli(_cli(workdir, tfds_dir, teachers))


def _params(directory):
    with open(os.path.join(directory, "params.msgpack"), "rb") as f:
        return jax.tree.leaves(flax.serialization.msgpack_restore(f.read()))


def _stats(directory) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, "target_stats.npz")) as f:
        return {key: f[key] for key in f.files}


def test_every_term_falls_and_the_worst_served_term_is_always_kept(reference):
    workdir, proc = reference
    rows = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for term in TERMS:
        values = [r[f"{term}_loss"] for r in rows]
        first, last = np.mean(values[:5]), np.mean(values[-5:])
        print(f"\n[agglomerative] {term}_loss: first 5 steps {first:.4f}, last 5 {last:.4f}")
        assert np.all(np.isfinite(values)) and last < first, (term, values)
    # per example the group's worst-served term is kept, so the kept fractions sum to 1 or more; and some
    # example dropped some term
    kept = np.array([[r[f"{term}_kept"] for term in LOSS_AWARE] for r in rows])
    assert np.all((kept >= 0) & (kept <= 1)), kept
    assert np.all(kept.sum(axis=1) >= 1.0), kept
    assert kept.min() < 1.0, kept
    assert proc.stderr.count(ESTIMATING) == 1, proc.stderr[-3000:]
    assert "from the first 2 training batches" in proc.stderr


def test_kills_and_resume_end_bit_identical_statistics_included(tmp_path, tfds_dir, teachers, reference):
    workdir, _ = reference
    killed = tmp_path / "killed"
    # the reference's compiled programs (the persistent compilation cache, unless JAX_COMPILATION_CACHE_DIR
    # puts it elsewhere): no state, only time saved
    if (workdir / ".jax_cache").is_dir():
        shutil.copytree(workdir / ".jax_cache", killed / ".jax_cache")
    cli = lambda d: _cli(d, tfds_dir, teachers)  # noqa: E731
    keys = (*(f"{term}_loss" for term in TERMS), *(f"{term}_kept" for term in LOSS_AWARE))
    # export/ holds the EMA weights, compared there; the online ones beside them
    logs = assert_kill_and_resume_match(cli, killed, workdir, keys, steps=KILL_STEPS)
    for a, b in zip(_params(workdir / "export_online"), _params(killed / "export_online"), strict=True):
        np.testing.assert_array_equal(a, b)
    for export in ("export", "export_online"):
        expected, got = _stats(workdir / export), _stats(killed / export)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=f"{export}: {key}")
        meta = [model_io.read_model_json(str(d / export)) for d in (workdir, killed)]
        assert meta[0] == meta[1]
    # PHI-S's statistics come from the fresh run's first batches only: each resume restores them
    assert ESTIMATING in logs[0], logs[0][-3000:]
    for log in logs[1:]:
        assert "resumed from" in log and ESTIMATING not in log, log[-3000:]


def test_export_carries_the_target_statistics_and_the_ema_weights(reference):
    workdir, _ = reference
    export, online = workdir / "export", workdir / "export_online"
    for directory in (export, online):
        meta = model_io.read_model_json(str(directory))
        assert set(meta["teachers"]) == {"deit", "mae", "dino"}
        norms = meta["target_norms"]
        assert norms["file"] == "target_stats.npz" and set(norms["terms"]) == set(NORMALIZED)
        stats = _stats(directory)
        expected_keys = {f"{t}/{f}" for t, (_, norm) in NORMALIZED.items() for f in STAT_FIELDS[norm]}
        assert stats.keys() == expected_keys
        rng = np.random.default_rng(0)
        for term, (teacher, norm) in NORMALIZED.items():
            described = norms["terms"][term]
            assert (described["teacher"], described["target_norm"]) == (teacher, norm)
            own = {f: stats[f"{term}/{f}"] for f in STAT_FIELDS[norm]}
            assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in own.values()), term
            assert own["mean"].shape == (WIDTH,) and np.any(own["mean"] != 0), term  # not the initial zeros
            if norm == "phi_s":
                r = own["rotation"]
                assert r.shape == (WIDTH, WIDTH) and own["scale"].shape == () and own["scale"] > 0
                np.testing.assert_allclose(r @ r.T, np.eye(WIDTH), atol=1e-5, err_msg=term)
                assert not np.allclose(r, np.eye(WIDTH)), term  # estimated, not the initial identity
            else:
                assert np.all(own["sq_mean"] >= own["mean"] ** 2 - 1e-6), term
                assert not np.allclose(own["sq_mean"], 1.0), term  # moved from the initial ones
            # model.json's inverse, evaluated on the exported arrays, maps the normalised targets back
            x = own["mean"] + rng.normal(size=(4, WIDTH)).astype(np.float32)
            y = np.asarray(target_norm.normalize(x, norm, own))
            rhs = described["inverse"].split("=", 1)[1]
            names = {"__builtins__": {}, "sqrt": np.sqrt, "maximum": np.maximum}
            back = eval(rhs, names, {**own, "target": y})
            np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-4, err_msg=f"{term}: {described}")
    for key, value in _stats(export).items():  # one run, one set of statistics beside both weights
        np.testing.assert_array_equal(_stats(online)[key], value)
    ema, weights = _params(export), _params(online)
    assert [a.shape for a in ema] == [b.shape for b in weights]
    assert any(not np.array_equal(a, b) for a, b in zip(ema, weights, strict=True))  # export/ is the EMA


def test_ema_export_loads_in_timm(reference, tmp_path):
    pytest.importorskip("torch", reason="needs torch: bash scripts/install_torch_cpu.sh")
    from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops

    declare_torchvision_ops()
    pytest.importorskip("timm", reason="needs timm: bash scripts/install_torch_cpu.sh")
    workdir, _ = reference
    err = timm_parity_error(str(workdir / "export"), str(tmp_path / "student.safetensors"))
    print(f"\n[parity] agglomerative EMA student -> timm: tokens max|err|={err:.2e}")
    assert err < 1e-5

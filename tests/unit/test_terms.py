"""The loss-term kinds (``hybrid_distill_jax.terms``) against numpy, their configuration, and the ViT's
hidden states they read.

Each kind's value inside ``DistillTask.loss_fn`` is recomputed here in float64 numpy from the models'
own outputs (the forward passes are tested elsewhere): token regression at a teacher's intermediate
block into a student block, per-channel standardisation of its targets, and the summary embedding.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hybrid_distill_jax import losses
from hybrid_distill_jax.config_lib import base_config, validate
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.build import normalize
from hybrid_distill_jax.models.vit import make_vit
from hybrid_distill_jax.tasks.distill import DistillTask, teacher_config, teachers_used
from hybrid_distill_jax.terms import TERMS, term_config
from tests.helpers import make_teacher, perturb, set_fields

B = 3


def _task(tmp_path, teachers: dict, terms: dict, score_teacher="", **student):
    """A pico/8 student (depth 3 unless given) at 32 px without masking, fp32 teachers of ``teachers``
    ({name: arch overrides}), the terms ``terms`` and ``masking.score_teacher``."""
    c = base_config("distill")
    c.image_size, c.batch_size = 32, B
    c.student.update(dict(variant="pico/8", depth=3, drop_path=0.0, **student))
    c.teachers = ml_collections.ConfigDict(
        {
            name: teacher_config(
                make_teacher(tmp_path / name, seed=i + 1, perturb_seed=i + 101, **arch), dtype="float32"
            )
            for i, (name, arch) in enumerate(teachers.items())
        }
    )
    c.terms = ml_collections.ConfigDict(terms)
    c.masking.score_teacher = score_teacher
    c.masking.stage_ratios = (0.0,)
    c.masking.stage_starts = (0.0,)
    validate(c, num_devices=1)
    return DistillTask(c)


def _run(task):
    params = task.init_params(jax.random.key(0))
    params["student"] = perturb(params["student"], 7)
    images = jax.random.uniform(jax.random.key(3), (B, 32, 32, 3))
    stage = task.stage(0, 10)
    _, metrics = jax.jit(task.loss_fn, static_argnums=4)(
        params, task.frozen, {"image": images}, jax.random.key(5), stage
    )
    return params, images, {k: float(v) for k, v in metrics.items()}


def whiten(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


def smooth_l1(pred, target, beta=2.0):
    d = np.abs(np.asarray(pred, np.float64) - target)
    return float(np.mean(np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)))


def dense(params, x):
    return np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])


# ---- values against numpy ---------------------------------------------------------------------------


def test_tokens_of_a_teacher_block_into_a_student_block_match_numpy(tmp_path):
    wide = dict(width=48, depth=4, num_heads=3, mlp_dim=96)
    terms = {"mid": term_config("tokens", "dino", teacher_block=2, student_block=1)}
    task = _task(tmp_path, {"dino": wide}, terms)
    params, images, metrics = _run(task)
    t = task.teachers["dino"]
    teacher = t.model.apply(
        {"params": task.frozen["dino"]}, normalize(images, t.mean, t.std, 32), hidden_layers=(2,)
    )
    student = task.student.apply(
        {"params": params["student"]}, normalize(images, task.mean, task.std, 32), hidden_layers=(1,)
    )
    target = whiten(teacher["hidden"][2])  # no masking: CLS + all 16 patches, in order
    pred = dense(params["heads"]["mid"], student["hidden"][1])
    assert pred.shape == target.shape == (B, 17, 48)
    np.testing.assert_allclose(metrics["mid_loss"], smooth_l1(pred, target), rtol=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["mid_loss"])


def test_standardized_targets_and_mse_match_numpy(tmp_path):
    terms = {"feat": term_config("tokens", "deit", target_norm="standardize", loss="mse", weight=0.5)}
    task = _task(tmp_path, {"deit": {}}, terms)
    params, images, metrics = _run(task)
    t = task.teachers["deit"]
    tokens = np.asarray(
        t.model.apply({"params": task.frozen["deit"]}, normalize(images, t.mean, t.std, 32))["tokens"],
        np.float64,
    )
    target = (tokens - tokens.mean((0, 1))) / np.sqrt(tokens.var((0, 1)) + 1e-6)  # per channel, over B x N
    student = task.student.apply({"params": params["student"]}, normalize(images, task.mean, task.std, 32))
    pred = dense(params["heads"]["feat"], student["tokens"])
    np.testing.assert_allclose(metrics["feat_loss"], np.mean((pred - target) ** 2), rtol=1e-5)
    assert metrics["loss"] == pytest.approx(0.5 * metrics["feat_loss"])


def test_embedding_term_matches_numpy_for_a_projected_and_a_plain_teacher(tmp_path):
    terms = {
        "clip_emb": term_config("embedding", "clip"),
        "plain_emb": term_config("embedding", "plain", loss="mse"),
    }
    # A CLIP-like teacher with a projection, on another patch grid (an embedding needs no grid match).
    task = _task(tmp_path, {"clip": dict(proj_dim=24, patch_size=4, variant="pico/4"), "plain": {}}, terms)
    params, images, metrics = _run(task)
    student = task.student.apply({"params": params["student"]}, normalize(images, task.mean, task.std, 32))
    cls = np.asarray(student["tokens"][:, 0], np.float64)
    for name, key, loss in (("clip", "embedding", "cosine"), ("plain", "tokens", "mse")):
        t = task.teachers[name]
        out = t.model.apply({"params": task.frozen[name]}, normalize(images, t.mean, t.std, t.image_size))
        target = np.asarray(out[key] if key == "embedding" else out["tokens"][:, 0], np.float64)
        pred = dense(params["heads"][f"{name}_emb"], cls)
        if loss == "cosine":
            expected = -np.mean(
                np.sum(pred * target, -1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
            )
        else:
            expected = np.mean((pred - target) ** 2)
        np.testing.assert_allclose(metrics[f"{name}_emb_loss"], expected, rtol=1e-5, err_msg=name)
    assert task.teachers["clip"].model.proj_dim == 24 and params["heads"]["clip_emb"]["kernel"].shape == (
        32,
        24,
    )


def test_mixed_cosine_and_smooth_l1_loss_matches_numpy(tmp_path):
    terms = {"feat": term_config("tokens", "deit", loss="mix", mix_cosine=0.9, mix_smooth_l1=0.1)}
    task = _task(tmp_path, {"deit": {}}, terms)
    params, images, metrics = _run(task)
    t = task.teachers["deit"]
    teacher = t.model.apply({"params": task.frozen["deit"]}, normalize(images, t.mean, t.std, 32))
    target = whiten(teacher["tokens"])
    student = task.student.apply({"params": params["student"]}, normalize(images, task.mean, task.std, 32))
    pred = dense(params["heads"]["feat"], student["tokens"])
    cosine = -np.mean(
        np.sum(pred * target, -1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
    )
    np.testing.assert_allclose(metrics["feat_loss"], 0.9 * cosine + 0.1 * smooth_l1(pred, target), rtol=1e-5)


def cosine_gram(x):
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return x @ np.swapaxes(x, -1, -2)


def test_gram_term_of_any_teacher_matches_numpy(tmp_path):
    """Gram relations with a teacher of another width, registers, no CLS and a MAP head (no attention map
    to read), and from the student's block 2 onto the teacher's block 1."""
    siglip = dict(width=48, num_heads=3, mlp_dim=96, class_token=False, pool="map", num_registers=2)
    terms = {"gram": term_config("gram", "siglip", student_block=2, teacher_block=1)}
    task = _task(tmp_path, {"siglip": siglip}, terms)
    params, images, metrics = _run(task)
    t = task.teachers["siglip"]
    teacher = t.model.apply(
        {"params": task.frozen["siglip"]}, normalize(images, t.mean, t.std, 32), hidden_layers=(1,)
    )["hidden"][1][:, 2:]
    student = task.student.apply(
        {"params": params["student"]}, normalize(images, task.mean, task.std, 32), hidden_layers=(2,)
    )["hidden"][2][:, 1:]
    expected = np.mean((cosine_gram(student) - cosine_gram(teacher)) ** 2)
    np.testing.assert_allclose(metrics["gram_loss"], expected, rtol=1e-5)


def test_gram_loss_gradient_matches_numpy():
    """d/dX of mean((G(X) - G(T))^2), G the cosine Gram: through the normalisation by hand in float64."""
    x = np.random.default_rng(0).normal(size=(2, 5, 8))
    t = np.random.default_rng(1).normal(size=(2, 5, 6))
    got = jax.grad(losses.gram_loss)(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    unit = x / norm
    d_gram = 2 * (cosine_gram(x) - cosine_gram(t)) / x.shape[0] / x.shape[1] ** 2
    d_unit = (d_gram + np.swapaxes(d_gram, -1, -2)) @ unit
    expected = (d_unit - unit * np.sum(d_unit * unit, axis=-1, keepdims=True)) / norm
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        losses.gram_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)),
        np.mean((cosine_gram(x) - cosine_gram(t)) ** 2),
        rtol=1e-5,
    )


# ---- the ViT's hidden states ------------------------------------------------------------------------


def test_hidden_states_are_the_residual_stream_before_drops_and_the_final_norm():
    vit = make_vit(dict(variant="pico/8", depth=3, image_size=32))
    params = perturb(vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], 1)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    drops = {1: jnp.tile(jnp.arange(0, 16, 2, dtype=jnp.int32), (2, 1))}  # keep 8 of 16 after block 1
    out = vit.apply({"params": params}, x, hidden_layers=(1, 3), drop_after=drops)
    assert out["hidden"][1].shape == (2, 17, 32)  # before the drop after block 1
    assert out["hidden"][3].shape == out["tokens"].shape == (2, 9, 32)
    normed = nn_layernorm(np.asarray(out["hidden"][3], np.float64), params["norm"])
    np.testing.assert_allclose(normed, np.asarray(out["tokens"]), atol=1e-5)


def nn_layernorm(x, p, eps=1e-6):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


# ---- configuration ----------------------------------------------------------------------------------


def test_the_registry_holds_the_three_kinds_and_term_config_fills_their_defaults():
    assert set(TERMS) == {"tokens", "relations", "embedding", "gram"}
    t = term_config("tokens", "dino", teacher_block=8)
    assert (t.kind, t.teacher, t.weight, t.teacher_block, t.student_block, t.target_norm) == (
        "tokens",
        "dino",
        1.0,
        8,
        0,
        "whiten",
    )
    with pytest.raises(ConfigError, match="no field 'layers'"):
        term_config("tokens", "dino", layers=(1,))
    with pytest.raises(ConfigError, match=r"\.kind='attention'"):
        term_config("attention", "dino")


def _checked(**changes):
    c = base_config("distill")
    c.image_size = 32
    c.student.variant = "pico/8"
    set_fields(c, changes, separator="__")
    validate(c, num_devices=1, check_teachers=False)
    return c


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(terms__feature__teacher="clip"),
            r"terms\.feature\.teacher='clip': no such teacher; config\.teachers has deit, mae",
        ),
        (dict(terms__feature__target_norm="l2"), r"terms\.feature\.target_norm='l2': expected one of"),
        (dict(terms__feature__teacher_block=-1), r"terms\.feature\.teacher_block must be an integer"),
        (dict(terms__relation__layers=(2,)), r"terms\.relation\.layers: layer 2 is outside 1\.\.1 "),
        (dict(terms__feature__weight=0.0, terms__relation__weight=0.0), "every term has weight 0"),
        (dict(masking__score_teacher="dino"), r"masking\.score_teacher='dino': no such teacher"),
        (dict(teachers__mae__attn_impl="flash"), r"teachers\.mae\.attn_impl='flash'"),
        (dict(teachers__deit__image_size=-1), r"teachers\.deit\.image_size must be"),
    ],
)
def test_bad_term_and_teacher_fields_are_one_line_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        _checked(**changes)


def test_a_misspelt_term_field_is_named():
    c = base_config("distill")
    c.terms.feature.wieght = 2.0
    with pytest.raises(ConfigError, match=r"terms\.feature\.wieght: not a field of a 'tokens' term"):
        validate(c, num_devices=1, check_teachers=False)


def test_only_the_teachers_an_active_term_or_the_scorer_names_are_loaded():
    c = base_config("distill")
    c.teachers.unused = teacher_config("no/such/dir")
    assert teachers_used(c, 12) == ("deit", "mae")
    c.terms.relation.weight = 0.0
    assert teachers_used(c, 12) == ("deit",)
    c.masking.score_teacher = ""
    c.terms.relation.weight, c.terms.feature.weight = 1.0, 0.0
    assert teachers_used(c, 12) == ("mae",)


def test_the_three_teacher_recipe_validates_without_a_download():
    from hybrid_distill_jax.config_file import load_config_file

    c = load_config_file("configs/hd3_vitb16_clip_dino_mae.py")
    assert sorted(c.teachers) == ["clip", "dino", "mae"]
    assert all(str(t.checkpoint).startswith("hf-hub:timm/") for t in c.teachers.values())
    assert (c.terms.dino_block8.teacher_block, c.terms.dino_block8.student_block) == (8, 8)
    validate(c, num_devices=8, deviceless=True)  # the listed names are described from a table


def test_a_dropped_term_leaves_the_total_on_some_steps_and_is_still_logged(tmp_path):
    terms = {
        "feature": term_config("tokens", "deit"),
        "relation": term_config("relations", "mae", drop_prob=0.5, weight=2.0),
    }
    task = _task(tmp_path, {"deit": {}, "mae": {}}, terms, score_teacher="deit")
    params = task.init_params(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(3), (B, 32, 32, 3))
    fn = jax.jit(task.loss_fn, static_argnums=4)
    outcomes = set()
    for seed in range(16):
        _, m = fn(params, task.frozen, {"image": images}, jax.random.key(seed), task.stage(0, 10))
        with_relation = float(m["feature_loss"] + 2.0 * m["relation_loss"])
        if float(m["loss"]) == pytest.approx(float(m["feature_loss"]), rel=1e-6):
            outcomes.add("dropped")
        else:
            assert float(m["loss"]) == pytest.approx(with_relation, rel=1e-6)
            outcomes.add("kept")
        assert float(m["relation_loss"]) > 0  # logged either way
    assert outcomes == {"dropped", "kept"}
    with pytest.raises(ConfigError, match=r"terms\.relation\.drop_prob must lie in \[0, 1\)"):
        _checked(terms__relation__drop_prob=1.0)

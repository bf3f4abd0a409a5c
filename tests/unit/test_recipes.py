"""The agglomerative recipe (``configs/hd_vitb16_agglomerative.py``): what it promises in its docstring
(PHI-S on every normalised target, RADIO's loss mix, the student EMA, this project's terms), that it
validates for its compile targets without a download, and that a user's teachers replace the defaults."""

import os

import pytest

from hybrid_distill_jax.config_file import load_config_file
from hybrid_distill_jax.config_lib import validate
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.teachers import hub_name

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RECIPE = os.path.join(REPO, "configs", "hd_vitb16_agglomerative.py")


def test_the_agglomerative_recipe_is_radio_like_and_validates_without_a_download():
    c = load_config_file(RECIPE)
    assert {name: t.checkpoint for name, t in c.teachers.items()} == {
        "dense": hub_name("dinov2reg_b14"),
        "language": hub_name("siglip2_b16"),
        "mae": hub_name("mae_b16"),
    }
    kinds = {name: (t.kind, t.teacher) for name, t in c.terms.items()}
    assert kinds == {
        "feature": ("tokens", "dense"),
        "dense_summary": ("embedding", "dense"),
        "summary": ("embedding", "language"),
        "language_tokens": ("tokens", "language"),
        "relation": ("relations", "mae"),
        "gram": ("gram", "dense"),
    }
    normalised = [t for t in c.terms.values() if "target_norm" in t]
    assert len(normalised) == 4 and all(t.target_norm == "phi_s" for t in normalised)
    for t in (c.terms.feature, c.terms.language_tokens):  # RADIO's feature loss
        assert (t.loss, t.mix_cosine, t.mix_smooth_l1) == ("mix", 0.9, 0.1)
    assert c.terms.summary.loss == c.terms.dense_summary.loss == "cosine"
    assert all(t.weight == 1.0 for t in c.terms.values())
    assert (c.ema.decay, c.ema.export) == (0.9996, "both")
    assert c.masking.score_teacher == "dense" and c.masking.mode == "over_training"
    validate(c, num_devices=1, deviceless=True)  # one H200 (docs/SCALING.md)
    validate(c, num_devices=16, num_processes=4, deviceless=True)  # a v5e 4x4 slice


def test_a_user_brings_teachers_by_short_name_directory_or_field(monkeypatch, tmp_path):
    c = load_config_file(f"{RECIPE}:dinov3_b16,siglip2_so400m14")
    assert (c.teachers.dense.checkpoint, c.teachers.language.checkpoint, c.teachers.mae.checkpoint) == (
        hub_name("dinov3_b16"),
        hub_name("siglip2_so400m14"),
        hub_name("mae_b16"),
    )
    validate(c, num_devices=8, deviceless=True)  # a /14 language teacher: resampled onto the student's grid
    c = load_config_file(f"{RECIPE}:teachers/a,hf-hub:timm/vit_base_patch16_clip_224.openai")
    assert c.teachers.dense.checkpoint == "teachers/a"
    assert c.teachers.language.checkpoint == hub_name("clip_b16")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mae_b16").mkdir()  # a directory of a known short name's name is the directory
    c = load_config_file(f"{RECIPE}:dinov2reg_b14,siglip2_b16,mae_b16")
    assert c.teachers.mae.checkpoint == "mae_b16"


def test_the_agglomerative_recipe_takes_loss_aware_dropping_and_refuses_bad_overrides():
    c = load_config_file(RECIPE)
    for name in ("summary", "dense_summary"):
        c.terms[name].drop, c.terms[name].drop_prob = "loss_aware", 0.5
    validate(c, num_devices=8, deviceless=True)
    c = load_config_file(RECIPE)
    c.terms.gram.weight, c.ema.decay = 0.0, 0.0  # the compile report's comparison
    validate(c, num_devices=1, deviceless=True)
    c.terms.summary.target_norm = "phi"
    with pytest.raises(ConfigError, match=r"terms\.summary\.target_norm"):
        validate(c, num_devices=1, deviceless=True)

"""What distillation promises beyond its loss value: which tokens the student sees, that the teachers stay
frozen through training, and that the distilled student leaves as a timm ViT computing the same tokens."""


import flax.linen as nn
import jax
import numpy as np
import pytest

from hybrid_distill_jax.config_lib import validate
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.tasks.distill import DistillTask
from hybrid_distill_jax.teachers import FrozenTeacher
from hybrid_distill_jax.train import Trainer
from tests.helpers import make_teacher, timm_parity_error, tiny_distill_config

torch = pytest.importorskip("torch", reason="needs torch: bash scripts/install_torch_cpu.sh")
from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops  # noqa: E402

declare_torchvision_ops()
timm = pytest.importorskip("timm", reason="needs timm: bash scripts/install_torch_cpu.sh")

STEPS = 3


@pytest.mark.parametrize(
    "teacher,arch,changes,message",
    [
        (
            "deit",
            dict(patch_size=4),
            {},
            "teachers.deit: patch grid 8x8 differs from the student's 4x4",
        ),
        ("mae", dict(num_heads=4, depth=4), {}, "head counts must match"),
        (
            "mae",
            dict(depth=2),
            {"terms.relation.layers": (3,)},
            "terms.relation.layers: layer 3 exceeds the depth 2 of teacher 'mae'",
        ),
        (
            "deit",
            dict(depth=2),
            {"masking.mode": "over_depth", "masking.drop_layers": (1, 3), "masking.drop_ratios": (0.25, 0.5)},
            "masking.drop_layers: layer 3 exceeds the scoring teacher's depth 2",
        ),
    ],
)
def test_validate_and_the_task_reject_the_same_teachers_alike(
    tmp_path, tfds_dir, teacher, arch, changes, message
):
    """One check serves both: ``validate`` on the teachers' model.json, the task on the loaded teachers."""
    c = tiny_distill_config(tmp_path, tfds_dir)
    c.student.depth = 4
    c.teachers.deit.checkpoint = make_teacher(tmp_path / "deep_feature", seed=1, depth=4)
    c.teachers.mae.checkpoint = make_teacher(tmp_path / "deep_relation", seed=2, depth=4)
    c.teachers[teacher].checkpoint = make_teacher(tmp_path / "odd", seed=3, **arch)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = c
        for key in parents:
            node = node[key]
        node[leaf] = value
    with pytest.raises(ConfigError) as from_files:
        validate(c)
    with pytest.raises(ConfigError) as from_loaded:
        DistillTask(c)
    assert message in str(from_files.value)
    assert str(from_files.value) == str(from_loaded.value)


def test_kept_tokens_are_the_top_k_of_the_feature_teachers_cls_attention(tmp_path, tfds_dir):
    c = tiny_distill_config(tmp_path, tfds_dir)
    c.masking.selection = "topk"
    c.masking.stage_starts, c.masking.stage_ratios = (0.0,), (0.5,)
    task = DistillTask(c)
    params = task.init_params(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    seen = []

    def record_student_input(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and kwargs.get("train"):  # only the student trains
            seen.append(np.asarray(kwargs["keep_indices"]))
        return next_fun(*args, **kwargs)

    stage = task.stage(0, STEPS)
    with nn.intercept_methods(record_student_input):
        task.loss_fn(params, task.frozen, {"image": images}, jax.random.key(2), stage)
    assert len(seen) == 1 and seen[0].shape == (4, 8)

    teacher = task.teachers["deit"]
    depth = teacher.model.depth
    logits = np.asarray(teacher(task.frozen["deit"], images, attn_layers=(depth,))["attn_logits"][depth])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    cls_attention = (e / e.sum(-1, keepdims=True))[:, :, 0, 1:].mean(axis=1)  # [B, 16], mean over heads
    order = np.argsort(-cls_attention, axis=1)
    kth, next_ = np.take_along_axis(cls_attention, order[:, 7:9], 1).T
    assert np.all(kth - next_ > 1e-6)  # no tie at the K-th score: the top-K set is well defined
    np.testing.assert_array_equal(seen[0], np.sort(order[:, :8], axis=1))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tfds_dir):
    """A few distillation steps with masking on: (trainer, result, config, the student's initial params)."""
    tmp = tmp_path_factory.mktemp("distilled")
    c = tiny_distill_config(tmp, tfds_dir, steps=STEPS, batch=8)
    c.masking.stage_ratios = (0.5, 0.5, 0.5)
    trainer = Trainer(c, str(tmp / "run"))
    initial = jax.device_get(trainer.initial_state()[0]["params"]["student"])
    result = trainer.run()
    return trainer, result, c, initial


def test_frozen_teachers_are_bit_identical_after_training(distilled):
    trainer, result, c, _ = distilled
    assert result.step == STEPS
    after = jax.device_get(trainer.frozen)
    assert set(after) == {"deit", "mae"}
    for name in after:
        _, original = FrozenTeacher.load(c.teachers[name], f"teachers.{name}")
        leaves_after, leaves_before = jax.tree.leaves(after[name]), jax.tree.leaves(jax.device_get(original))
        assert len(leaves_after) == len(leaves_before) > 0
        for a, b in zip(leaves_after, leaves_before):
            np.testing.assert_array_equal(a, b)


def test_distilled_student_exports_to_timm(distilled, tmp_path):
    _, result, _, initial = distilled
    model, params, _ = model_io.load_model(result.export_dir)
    trained = jax.device_get(result.params["student"])
    for exported, ours in zip(jax.tree.leaves(params), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(exported, ours)  # the export is the distilled student...
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial))]
    assert any(moved)  # ... which training moved away from its initialisation

    err = timm_parity_error(result.export_dir, str(tmp_path / "student.safetensors"))
    print(f"\n[parity] distilled student -> timm: tokens max|err|={err:.2e}")
    assert err < 1e-5

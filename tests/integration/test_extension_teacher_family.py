"""A new teacher family is one file: ``teachers/families/<name>.py``, nothing else edited.

A copy of the package with only ``teachers/families/toy.py`` added (``helpers.package_with_one_more_file``)
imports a checkpoint in the toy family's own key layout through the public command line, and the
converted teacher computes what the model the checkpoint was written from computes.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import make_vit
from hybrid_distill_jax.teachers import families, torch_io
from tests.helpers import ARCH, package_with_one_more_file, perturb

# A toy family: timm-like tensors under other names, a wrapper prefix, an auxiliary head to drop, and
# its own input normalisation.
TOY_FAMILY = '''"""Toy checkpoints: a timm-like ViT under 'toy_model.', blocks named 'layers.{i}'."""

import dataclasses

from hybrid_distill_jax.teachers.families.base import TIMM_LAYOUT, Family, register

TOY_LAYOUT = dataclasses.replace(TIMM_LAYOUT, block="layers.{i}", what="toy ViTs")

register(
    Family(
        "toy",
        TOY_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        prefix="toy_model.",
        drop=((r"^aux_head\\.", "toy auxiliary head"),),
        help="toy checkpoints (tests/integration/test_extension_teacher_family.py)",
    )
)
'''


def test_a_toy_family_in_one_file_imports_a_toy_checkpoint(tmp_path):
    model = make_vit({**ARCH, "image_size": 32})
    params = perturb(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], seed=3)
    timm_keys = families.from_flax(families.get_family("timm"), model, params)
    checkpoint = {f"toy_model.{k.replace('blocks.', 'layers.')}": v for k, v in timm_keys.items()}
    checkpoint["toy_model.aux_head.weight"] = np.ones((3, model.width), np.float32)
    path = torch_io.save_state_dict(checkpoint, str(tmp_path / "toy.safetensors"))

    env = package_with_one_more_file(tmp_path, "teachers/families/toy.py", TOY_FAMILY)
    out = str(tmp_path / "teacher")
    cli = [sys.executable, "-m", "hybrid_distill_jax.teachers", "import"]
    args = ["--family", "toy", "--input", path, "--output", out, "--heads", str(model.num_heads)]
    proc = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dropped toy auxiliary head: 1 tensor" in proc.stdout

    loaded, loaded_params, meta = model_io.load_model(out)
    assert meta["converted_from"]["family"] == "toy" and meta["input"]["mean"] == [0.5, 0.5, 0.5]
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    expected = model.apply({"params": params}, images)["tokens"]
    got = loaded.apply({"params": loaded_params}, images)["tokens"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)

    # This checkout, without the file, knows no such family: the same command is a one-line error.
    plain = dict(env, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    refused = subprocess.run(
        [*cli, *args[:-1], str(tmp_path / "other"), "--heads", "2"], capture_output=True, text=True, env=plain
    )
    assert refused.returncode == 2 and "invalid choice: 'toy'" in refused.stderr

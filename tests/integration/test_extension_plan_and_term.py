"""A masking plan and a kind of loss term are one file each: a copy of the package with exactly that file
added (``package_with_one_more_file``) runs it through the public config and command line."""

import subprocess

import pytest

from hybrid_distill_jax.train import metrics
from tests.helpers import make_teacher, package_with_one_more_file, tiny_cli

TOY_PLAN = '''"""A toy plan: a fixed fraction ``toy_keep`` of the patches at the student's input."""

import dataclasses

from hybrid_distill_jax import checks
from hybrid_distill_jax.masking.base import KeepPlan, KeptTokens, register, select_tokens


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyPlan(KeepPlan):
    mode = "toy_fraction"
    defaults = dict(toy_keep=0.5)
    ranges = dict(toy_keep=checks.Range(0.0, 1.0, open_lo=True, open_hi=False))

    keep: int

    @classmethod
    def from_config(cls, mcfg, num_patches, depth):
        return cls(keep=max(1, int(num_patches * mcfg.toy_keep)), **cls._common(mcfg, num_patches))

    def stage(self, step, total_steps):
        return self.keep

    def stage_metrics(self, stage):
        return {"keep": stage}

    def score_layers(self, teacher_depth):
        return (teacher_depth,)

    def patches_per_block(self, stage, depth):
        return (stage,) * depth

    def select(self, rng, scores_by_layer, stage):
        (scores,) = scores_by_layer.values()
        keep = select_tokens(rng, scores, stage, self.selection, self.temperature)
        return KeptTokens(input_indices=keep, drop_after=None, sets=((1, keep),))
'''

TOY_TERM = '''"""A toy term: the squared difference of the student's and the teacher's mean CLS activation."""

import jax.numpy as jnp

from hybrid_distill_jax import checks
from hybrid_distill_jax.terms.base import Term, register


@register
class ToyTerm(Term):
    kind = "toy"
    defaults = dict(scale=1.0)
    ranges = dict(scale=checks.POSITIVE)
    needs_grid = False

    def value(self, params, inputs):
        student = jnp.mean(inputs.student["tokens"][:, 0].astype(jnp.float32), axis=-1)
        teacher = jnp.mean(inputs.teacher["tokens"][:, 0].astype(jnp.float32), axis=-1)
        return self.cfg.scale * jnp.mean((student - teacher) ** 2)
'''

# A user's config file: the tiny distillation plus a term of the toy kind.
TOY_TERM_CONFIG = """from hybrid_distill_jax.terms import term_config
from tests.tiny_config import get_config as tiny_config


def get_config(arg=None):
    c = tiny_config()
    c.terms.toy = term_config("toy", "deit", weight=0.5, scale=2.0)
    return c
"""


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("extension_teachers")
    return [make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)]


def _run(tmp_path, env, tfds_dir, teachers, workdir, *overrides, config=None):
    """``tiny_cli`` (``config`` instead of tests/tiny_config.py if given) with ``overrides``, run from
    ``tmp_path``: ``python -m`` imports from its working directory first, and the copy must be imported."""
    command = tiny_cli(tmp_path / workdir, tfds_dir, teachers)
    if config is not None:
        command[command.index("--config") + 1] = str(config)
    return subprocess.run(
        [*command, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_masking_plan_is_one_file(tmp_path, tfds_dir, teachers):
    env = package_with_one_more_file(tmp_path, "masking/toy.py", TOY_PLAN)
    overrides = ("--config.total_steps=2", "--config.masking.mode=toy_fraction")
    proc = _run(tmp_path, env, tfds_dir, teachers, "run", *overrides, "--config.masking.toy_keep=0.375")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 16 patches (32 px, patch 8): the toy plan keeps 6 at every step, no stage of over_training's does.
    rows = [row for row in metrics.read_metrics(str(tmp_path / "run")) if "keep" in row]
    assert [row["keep"] for row in rows] == [6, 6], rows

    proc = _run(tmp_path, env, tfds_dir, teachers, "bad", *overrides, "--config.masking.toy_keep=1.5")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0] == "error: masking.toy_keep must lie in (0, 1], got 1.5", errors[0]


def test_a_term_kind_is_one_file(tmp_path, tfds_dir, teachers):
    env = package_with_one_more_file(tmp_path, "terms/toy.py", TOY_TERM)
    config = tmp_path / "toy_term_config.py"
    config.write_text(TOY_TERM_CONFIG)
    proc = _run(tmp_path, env, tfds_dir, teachers, "run", "--config.total_steps=2", config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for row in metrics.read_metrics(str(tmp_path / "run")) if "toy_loss" in row]
    assert len(rows) == 2 and all(row["toy_loss"] >= 0 for row in rows), rows

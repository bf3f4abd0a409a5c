"""Records the distillation objective on one fixed batch: tests/data/objective_baseline.json.

    python -m scripts.record_objective_baseline      (from the repository root; prints the table)

Each entry of ``ENTRIES`` is a set of config overrides (dotted field -> plain JSON value) on top of
``SETUP["common"]``, both applied to ``base_config("distill")``, whose loss and masking sections the
fixture records as ``defaults``. For each, ``objective_values`` builds the tiny fp32 task (a pico/8
student and two perturbed pico/8 teachers, all described in ``SETUP``) and returns its loss terms,
total and global gradient norm at one masking stage.
tests/integration/test_objective_baseline.py recomputes every entry from the fixture and compares.
"""

from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as tests/conftest.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402

from hybrid_distill_jax.config_lib import base_config  # noqa: E402
from hybrid_distill_jax.tasks.distill import DistillTask  # noqa: E402
from tests.helpers import REPO, make_teacher, perturb  # noqa: E402

FIXTURE = os.path.join(REPO, "tests", "data", "objective_baseline.json")
NOTE = (
    "Recorded before the issue-22 redesign (named teachers and loss terms) from the two-role objective. "
    "The test compares at rtol 1e-5 (another CPU may differ in the last bits); on the machine that "
    "recorded it the redesigned objective must match every value at rtol 1e-6, with each entry's "
    "overrides translated to the new config form."
)

# What every entry shares. Teachers: make_vit(arch), init from init_seed, then every weight replaced by
# tests.helpers.perturb(params, perturb_seed). Student: task.init_params(init_seed), then the student's
# weights (not the feature head's) perturbed likewise. The batch: uniform [0, 1) images from image_seed;
# loss_fn's rng from rng_seed; the masking stage is task.stage(step, total_steps).
SETUP = {
    "common": {
        "image_size": 32,
        "batch_size": 4,
        "student.variant": "pico/8",
        "student.depth": 4,
        "student.drop_path": 0.0,
        "teachers.feature.dtype": "float32",
        "teachers.relation.dtype": "float32",
    },
    "teachers": {
        role: {
            "arch": {"variant": "pico/8", "depth": 4, "drop_path": 0.0, "image_size": 32},
            "init_seed": seed,
            "perturb_seed": seed + 100,
        }
        for role, seed in (("feature", 1), ("relation", 2))
    },
    "student": {"init_seed": 0, "perturb_seed": 7},
    "batch": {"image_shape": [4, 32, 32, 3], "image_seed": 3, "rng_seed": 5},
    "stage": {"step": 7, "total_steps": 10},  # over_training: the last stage (mask ratio 0.5, 8 patches)
    "jax": {"platform": "cpu", "x64": False, "threefry_partitionable": True},
}

_OVER_DEPTH = {  # drops after blocks 1 and 2: the distilled blocks 1, 2, 3 see 16, 12 and 8 patches
    "masking.mode": "over_depth",
    "masking.drop_layers": [1, 2],
    "masking.drop_ratios": [0.25, 0.5],
}
ENTRIES = {
    "default": {},
    "fd_only": {"loss.beta": 0.0},
    "relation_only": {"loss.alpha": 0.0},
    "over_depth": _OVER_DEPTH,
    "relation_on_kept": {"loss.relation_teacher_on_kept": True},
    "over_depth_relation_on_kept": {**_OVER_DEPTH, "loss.relation_teacher_on_kept": True},
}


def export_teachers(setup: dict, directory: str) -> dict[str, str]:
    """{role: model directory} of the teachers ``setup`` describes, written under ``directory``."""
    return {
        role: make_teacher(os.path.join(directory, role), t["init_seed"], t["perturb_seed"], **t["arch"])
        for role, t in setup["teachers"].items()
    }


def make_config(setup: dict, overrides: dict, teacher_dirs: dict[str, str]):
    """``base_config('distill')`` with the common and the entry's overrides (JSON lists -> tuples)."""
    c = base_config("distill")
    for role, path in teacher_dirs.items():
        c.teachers[role].checkpoint = path
    for dotted, value in {**setup["common"], **overrides}.items():
        *parents, leaf = dotted.split(".")
        node = c
        for key in parents:
            node = node[key]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return c


def objective_values(setup: dict, overrides: dict, teacher_dirs: dict[str, str]) -> dict:
    """{'metrics': loss_fn's metrics (each term and 'loss'), 'grad_norm': the global norm of the gradient
    of the total over all trained parameters, 'stage': the masking stage} for one entry."""
    task = DistillTask(make_config(setup, overrides, teacher_dirs))
    params = task.init_params(jax.random.key(setup["student"]["init_seed"]))
    params["student"] = perturb(params["student"], setup["student"]["perturb_seed"])
    b = setup["batch"]
    batch = {"image": jax.random.uniform(jax.random.key(b["image_seed"]), tuple(b["image_shape"]))}
    stage = task.stage(setup["stage"]["step"], setup["stage"]["total_steps"])
    fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True), static_argnums=4)
    (_, metrics), grads = fn(params, task.frozen, batch, jax.random.key(b["rng_seed"]), stage)
    return {
        "metrics": {name: float(v) for name, v in sorted(metrics.items())},
        "grad_norm": float(optax.tree.norm(grads)),
        "stage": list(stage) if isinstance(stage, tuple) else stage,
    }


def configure_jax(setup: dict) -> None:
    """The JAX settings the values were recorded under."""
    jax.config.update("jax_platforms", setup["jax"]["platform"])
    jax.config.update("jax_enable_x64", setup["jax"]["x64"])
    jax.config.update("jax_threefry_partitionable", setup["jax"]["threefry_partitionable"])


def objective_defaults() -> dict:
    """The loss and masking sections of ``base_config('distill')``, the defaults the overrides change."""
    c = base_config("distill")
    return {section: c[section].to_dict() for section in ("loss", "masking")}


def main() -> None:
    configure_jax(SETUP)
    with tempfile.TemporaryDirectory() as tmp:
        teachers = export_teachers(SETUP, tmp)
        entries = {
            name: {"overrides": overrides, **objective_values(SETUP, overrides, teachers)}
            for name, overrides in ENTRIES.items()
        }
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
        record = {"note": NOTE, "jax_version": jax.__version__, "defaults": objective_defaults(), **SETUP}
        json.dump({**record, "entries": entries}, f, indent=2)
        f.write("\n")
    for name, e in entries.items():
        terms = ", ".join(f"{k}={v:.9g}" for k, v in e["metrics"].items())
        print(f"{name:28s} {terms}, grad_norm={e['grad_norm']:.9g}, stage={e['stage']}")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()

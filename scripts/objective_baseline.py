"""The distillation objective on one fixed batch, against tests/data/objective_baseline.json.

    python -m scripts.objective_baseline      (from the repository root; prints recorded vs today)

The fixture was recorded from the two-role objective (``teachers.feature``/``teachers.relation``,
``loss.alpha``/``loss.beta``) before named teachers and terms replaced it. Each entry holds its overrides
in that form (dotted field -> plain JSON value, on top of ``SETUP["common"]``), its loss terms, total and
global gradient norm at one masking stage. ``translate`` writes those overrides in today's form;
``objective_values`` builds the tiny fp32 task they describe (a pico/8 student and two perturbed pico/8
teachers, all described in ``SETUP``) and computes the same numbers.
tests/integration/test_objective_baseline.py compares them with the fixture.
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
from tests.helpers import REPO, make_teacher, perturb, set_fields  # noqa: E402

FIXTURE = os.path.join(REPO, "tests", "data", "objective_baseline.json")

# The two-role form -> today's: teachers.feature is base_config's teachers.deit, teachers.relation its
# teachers.mae, the loss section the two terms' fields. Values are translated by the functions.
TEACHER_NAMES = {"feature": "deit", "relation": "mae"}
FIELDS = {
    "loss.alpha": ("terms.feature.weight", None),
    "loss.beta": ("terms.relation.weight", None),
    "loss.feature_loss": ("terms.feature.loss", None),
    "loss.smooth_l1_beta": ("terms.feature.smooth_l1_beta", None),
    "loss.whiten_target": ("terms.feature.target_norm", lambda v: "whiten" if v else "none"),
    "loss.head": ("terms.feature.head", None),
    "loss.relation_loss": ("terms.relation.loss", None),
    "loss.relation_layers": ("terms.relation.layers", None),
    "loss.relation_teacher_on_kept": ("terms.relation.teacher_on_kept", None),
    "masking.score_source": (
        "masking.score_teacher",
        {"feature_teacher": "deit", "relation_teacher": "mae", "uniform": ""}.get,
    ),
}


def translate(overrides: dict) -> dict:
    """Two-role overrides (dotted field -> value) in today's form."""
    out = {}
    for dotted, value in overrides.items():
        section, _, rest = dotted.partition(".")
        if section == "teachers":
            role, _, leaf = rest.partition(".")
            out[f"teachers.{TEACHER_NAMES[role]}.{leaf}"] = value
        elif dotted in FIELDS:
            new, convert = FIELDS[dotted]
            out[new] = convert(value) if convert else value
        else:
            out[dotted] = value
    return out


def translate_defaults(defaults: dict) -> dict:
    """The fixture's recorded ``loss`` and ``masking`` sections as today's ``terms`` and ``masking``."""
    flat = {f"{section}.{k}": v for section, fields in defaults.items() for k, v in fields.items()}
    new = translate(flat)
    out: dict = {}
    for dotted, value in new.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out



def export_teachers(setup: dict, directory: str) -> dict[str, str]:
    """{teacher name: model directory} of the teachers ``setup`` describes, written under ``directory``."""
    return {
        TEACHER_NAMES[role]: make_teacher(
            os.path.join(directory, role), t["init_seed"], t["perturb_seed"], **t["arch"]
        )
        for role, t in setup["teachers"].items()
    }


def make_config(setup: dict, overrides: dict, teacher_dirs: dict[str, str]):
    """``base_config('distill')`` with the common and the entry's overrides, translated to today's form
    (JSON lists -> tuples)."""
    c = base_config("distill")
    for name, path in teacher_dirs.items():
        c.teachers[name].checkpoint = path
    changes = translate({**setup["common"], **overrides})
    return set_fields(c, {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


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


def main() -> None:
    with open(FIXTURE) as f:
        fixture = json.load(f)
    configure_jax(fixture)
    print(f"{'entry':28s} {'value':14s} {'recorded':>14s} {'today':>14s} {'rel. diff':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        teachers = export_teachers(fixture, tmp)
        for name, entry in fixture["entries"].items():
            got = objective_values(fixture, entry["overrides"], teachers)
            pairs = [(k, v, got["metrics"].get(k, float("nan"))) for k, v in entry["metrics"].items()]
            pairs.append(("grad_norm", entry["grad_norm"], got["grad_norm"]))
            for key, recorded, today in pairs:
                rel = abs(today - recorded) / abs(recorded)
                print(f"{name:28s} {key:14s} {recorded:14.9g} {today:14.9g} {rel:10.2e}")


if __name__ == "__main__":
    main()

"""The distillation objective still gives the recorded numbers (tests/data/objective_baseline.json).

The fixture holds, per configuration (its overrides in the two-role form it was recorded in), every loss
term, the total and the global gradient norm of the objective as it was before named teachers and terms
replaced the two roles. ``scripts.objective_baseline`` writes each configuration in today's form and
computes the same numbers (``python -m scripts.objective_baseline`` prints them side by side). rtol 1e-5
leaves room for another CPU's last bits; on the machine that recorded them they agree to 1e-6.
"""

import json

import numpy as np
import pytest

from hybrid_distill_jax.config_lib import base_config
from scripts import objective_baseline as baseline

with open(baseline.FIXTURE) as f:
    FIXTURE = json.load(f)
RTOL = 1e-5


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    return baseline.export_teachers(FIXTURE, str(tmp_path_factory.mktemp("baseline_teachers")))


def test_the_recorded_defaults_are_todays_defaults_in_the_new_form():
    c = base_config("distill")
    recorded = baseline.translate_defaults(FIXTURE["defaults"])
    for section, name in (("masking", None), *(("terms", n) for n in recorded["terms"])):
        fields = recorded[section] if name is None else recorded[section][name]
        today = json.loads(json.dumps((c[section] if name is None else c[section][name]).to_dict()))
        assert {k: today[k] for k in fields} == fields, (section, name)
    # Fields the two-role form did not have keep its behaviour: the final tokens of both models, no
    # rounding of kept counts, no term dropped.
    assert c.terms.feature.teacher_block == c.terms.feature.student_block == 0
    assert c.masking.token_multiple == 1
    assert c.terms.feature.drop_prob == c.terms.relation.drop_prob == 0.0
    assert set(c.teachers) == set(baseline.TEACHER_NAMES.values())


@pytest.mark.parametrize("name", sorted(FIXTURE["entries"]))
def test_objective_matches_the_recorded_baseline(name, teacher_dirs):
    recorded = FIXTURE["entries"][name]
    got = baseline.objective_values(FIXTURE, recorded["overrides"], teacher_dirs)
    assert got["stage"] == recorded["stage"]
    assert set(got["metrics"]) == set(recorded["metrics"])
    for term, value in recorded["metrics"].items():
        np.testing.assert_allclose(got["metrics"][term], value, rtol=RTOL, err_msg=f"{name}: {term}")
    np.testing.assert_allclose(got["grad_norm"], recorded["grad_norm"], rtol=RTOL, err_msg=f"{name}: grad")

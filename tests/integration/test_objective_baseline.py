"""The distillation objective still gives the recorded numbers (tests/data/objective_baseline.json).

The fixture holds, per configuration (its overrides in plain data), every loss term, the total and the
global gradient norm of the two-role objective as it was before the issue-22 redesign; it is written by
``python -m scripts.record_objective_baseline``. rtol 1e-5 leaves room for another CPU's last bits.
"""

import json

import numpy as np
import pytest

from hybrid_distill_jax.config_lib import base_config
from scripts import record_objective_baseline as baseline

with open(baseline.FIXTURE) as f:
    FIXTURE = json.load(f)
RTOL = 1e-5


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    return baseline.export_teachers(FIXTURE, str(tmp_path_factory.mktemp("baseline_teachers")))


def test_the_fixture_covers_every_entry_under_todays_settings():
    assert set(FIXTURE["entries"]) == set(baseline.ENTRIES)
    for name, entry in FIXTURE["entries"].items():
        assert entry["overrides"] == baseline.ENTRIES[name], name
    c = base_config("distill")
    for section, fields in FIXTURE["defaults"].items():
        today = json.loads(json.dumps(c[section].to_dict()))
        assert today == fields, f"config.{section} defaults changed: translate the fixture's, not its numbers"


@pytest.mark.parametrize("name", sorted(FIXTURE["entries"]))
def test_objective_matches_the_recorded_baseline(name, teacher_dirs):
    recorded = FIXTURE["entries"][name]
    got = baseline.objective_values(FIXTURE, recorded["overrides"], teacher_dirs)
    assert got["stage"] == recorded["stage"]
    assert set(got["metrics"]) == set(recorded["metrics"])
    for term, value in recorded["metrics"].items():
        np.testing.assert_allclose(got["metrics"][term], value, rtol=RTOL, err_msg=f"{name}: {term}")
    np.testing.assert_allclose(got["grad_norm"], recorded["grad_norm"], rtol=RTOL, err_msg=f"{name}: grad")

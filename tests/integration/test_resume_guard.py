"""The resolved config saved in the workdir, and the resume guard (``train/run_config.py``): a resume
whose objective, models, data or optimizer changed is refused in one line before any work, a term removed
as much as one added; ``resume_with_changes=True`` resumes anyway; what may change (logging, evaluation)
does."""

import json
import subprocess

import pytest

from tests.helpers import REPO, files_under, make_teacher, run_cli, tiny_cli, tiny_cli_env


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard_teachers")
    return make_teacher(root / "deit", seed=1), make_teacher(root / "mae", seed=2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tfds_dir, teachers):
    """A finished 4-step run with its checkpoints, and its command line."""
    workdir = tmp_path_factory.mktemp("guard") / "run"
    cli = [*tiny_cli(workdir, tfds_dir, teachers), "--config.total_steps=4", "--config.checkpoint_every=2"]
    run_cli(cli)
    return workdir, cli


def test_the_resolved_config_is_saved_in_the_workdir(finished):
    workdir, _ = finished
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["total_steps"] == 4 and saved["terms"]["relation"]["kind"] == "relations"
    assert saved["resume_with_changes"] is False


@pytest.mark.parametrize(
    "change,named",
    [
        ("--config.terms.relation.weight=0.0", "terms.relation.weight: 1.0 -> 0.0"),  # a term removed
        ("--config.optim.lr=0.01", "optim.lr: 0.001 -> 0.01"),
        ("--config.student.drop_path=0.0", "student.drop_path: 0.1 -> 0.0"),
    ],
)
def test_a_changed_objective_or_optimizer_is_refused_in_one_line(finished, change, named):
    workdir, cli = finished
    before = files_under(workdir)
    proc = subprocess.run(
        [*cli, change], cwd=REPO, env=tiny_cli_env(), capture_output=True, text=True, timeout=300
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert named in errors[0] and "resume_with_changes=True" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    after = {k: v for k, v in files_under(workdir).items() if k != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}  # nothing written, nothing lost


def test_the_override_resumes_and_harmless_changes_pass(finished):
    workdir, cli = finished
    proc = run_cli([*cli, "--config.log_every=1", "--config.eval.knn_k=5"])
    assert "resumed from" in proc.stderr
    proc = run_cli([*cli, "--config.terms.relation.weight=0.0", "--config.resume_with_changes=True"])
    assert "resumed from" in proc.stderr and "resume_with_changes=True" in proc.stderr
    with open(workdir / "config.json") as f:
        assert json.load(f)["terms"]["relation"]["weight"] == 0.0  # the config it ran with, saved

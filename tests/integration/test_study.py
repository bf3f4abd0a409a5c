"""The study chain end to end at smoke size: stages, fine-tunes, diagnostics, plots and RESULTS.md."""

import importlib.util
import json
import os

from hybrid_distill_jax.experiments.study import run_study


def _study_config(arg="smoke"):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "study.py")
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_full_config_lists_the_paper_ablation():
    c = _study_config(None)
    assert c.students == ("fd_only", "relation_only", "hybrid_nomask", "hybrid_random", "hybrid_progressive")
    assert c.fd_only.loss.beta == 0 and c.relation_only.loss.alpha == 0
    assert max(c.hybrid_nomask.masking.stage_ratios) == 0
    assert c.hybrid_random.masking.selection == "random"
    assert c.hybrid_progressive.masking.selection == "gumbel"
    assert c.hybrid_progressive.masking.score_source == "feature_teacher"
    assert "random_init" in c.finetune_models


def test_smoke_study_writes_results(tmp_path, tfds_dir):
    c = _study_config()
    c.data.data_dir = tfds_dir
    c.report_dir = str(tmp_path / "docs")
    summary = run_study(c, str(tmp_path / "study"))
    models = summary["models"]
    assert set(models) == {"teacher_supervised", "teacher_mae", "hybrid_progressive", "random_init"}
    assert 0 < models["hybrid_progressive"]["finetune_top1"] <= 100
    for r in models.values():
        assert 0 < r["knn_top1"] <= 100 and 0 <= r["nmi_last"] <= 1
    report = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## The paper's claims at this scale" in report and "configs/study.py" in report
    for png in ("accuracy", "attention_distance_teachers_vs_students", "nmi_all"):
        assert os.path.getsize(tmp_path / "docs" / "results" / f"{png}.png") > 5000
        assert f"results/{png}.png" in report or png == "nmi_all"
    # The trainer's diagnostics hook ran inside the Hybrid stage.
    with open(tmp_path / "study" / "hybrid_progressive" / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "diag/nmi/mean" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]  # every 2 steps, at log boundaries
    for r in rows:
        assert 0.0 <= r["diag/nmi/layer1"] <= 1.0 and r["diag/distance/layer2"] > 0.0
    # A re-run reuses every stage.
    again = run_study(c, str(tmp_path / "study"))
    assert again["models"]["teacher_mae"]["knn_top1"] == models["teacher_mae"]["knn_top1"]
    assert again["wall_seconds"] < summary["wall_seconds"]

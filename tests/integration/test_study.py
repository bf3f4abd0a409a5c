"""The study chain end to end at smoke size: teachers once, students, fine-tunes and the untrained student
per seed (2 seeds), diagnostics, the masking timing, paired intervals and verdicts, plots and RESULTS.md."""

import importlib.util
import json
import os

import pytest

from hybrid_distill_jax import config_lib
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.experiments import report
from hybrid_distill_jax.experiments.study import _shared, run_study
from hybrid_distill_jax.experiments.study_agglomerative import run_agglomerative


def _study_config(arg="smoke"):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "study.py")
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_full_config_lists_the_paper_ablation():
    c = _study_config(None)
    assert c.students == ("fd_only", "relation_only", "hybrid_nomask", "hybrid_random", "hybrid_progressive")
    assert c.fd_only.terms.relation.weight == 0 and c.relation_only.terms.feature.weight == 0
    assert max(c.hybrid_nomask.masking.stage_ratios) == 0
    assert c.hybrid_random.masking.selection == "random"
    assert c.hybrid_progressive.masking.selection == "gumbel"
    assert c.hybrid_progressive.masking.score_teacher == "deit"
    assert c.seeds == 3 and {"teacher_supervised", "teacher_mae"} <= set(c.finetune_models)
    # An 8x8 patch grid: attention distance has room between 0 (self) and ~16.5 px (uniform).
    assert report.distance_bounds(c.image_size, c.variant)["grid"] >= 8


@pytest.mark.parametrize("arg", ["agglomerative", "agglomerative,smoke"])
def test_agglomerative_config_changes_one_thing_per_student(arg):
    """configs/study.py:agglomerative: the study's Hybrid student, and the same with PHI-S feature targets
    or a student EMA, nothing else changed; every stage passes validation."""
    c = _study_config(arg)
    main = _study_config("smoke" if "smoke" in arg else None)
    assert c.mode == "study_agglomerative" and c.students == (
        "hybrid_progressive",
        "hybrid_phi_s",
        "hybrid_ema",
    )
    assert c.hybrid_progressive.to_dict() == main.hybrid_progressive.to_dict()  # the study's stage, reused
    assert c.hybrid_phi_s.terms.feature.target_norm == "phi_s" and c.hybrid_ema.ema.decay > 0
    for key in ("hybrid_phi_s", "hybrid_ema"):
        diff = c[key].to_dict()
        ref = c.hybrid_progressive.to_dict()
        for d in (diff, ref):
            d.pop("name")
            d["terms"]["feature"].pop("target_norm")
            d["terms"]["feature"].pop("phi_s_batches")
            d.pop("ema")
        assert diff == ref, key
    for key in ("teacher_supervised", "teacher_mae", *c.students):
        config_lib.validate(_shared(c, c[key]), check_teachers=False)
    with pytest.raises(ValueError, match="unknown argument"):
        _study_config("agglomerativ")


def test_agglomerative_bad_difference_is_named(tmp_path):
    c = _study_config("agglomerative,smoke")
    c.differences = (("hybrid_phi_s", "fd_only"),)
    with pytest.raises(ConfigError, match=r"^differences: .*fd_only"):
        run_agglomerative(c, str(tmp_path / "study"))
    assert not (tmp_path / "study" / "teacher_supervised").exists()


@pytest.mark.parametrize(
    "field,value", [("seeds", 0), ("masking_cost.mask_ratio", 1.0), ("masking_cost.image_size", 30)]
)
def test_bad_study_fields_are_named(tmp_path, field, value):
    c = _study_config()
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
    with pytest.raises(ConfigError, match=f"^{field}: "):
        run_study(c, str(tmp_path / "study"))
    assert not (tmp_path / "study" / "teacher_supervised").exists()


def test_smoke_study_writes_results(tmp_path, tfds_dir):
    c = _study_config()
    c.data.data_dir = tfds_dir
    c.report_dir = str(tmp_path / "docs")
    work = tmp_path / "study"
    summary = run_study(c, str(work))
    models = summary["models"]
    assert set(models) == {"teacher_supervised", "teacher_mae", "hybrid_progressive", "random_init"}
    assert summary["seeds"] == 2 and all(len(rows) == 2 for rows in models.values())
    # Teachers trained once, everything else per seed.
    assert (work / "teacher_mae").is_dir() and not (work / "teacher_mae_seed0").exists()
    for name in (
        "hybrid_progressive",
        "random_init",
        "finetune_hybrid_progressive",
        "finetune_teacher_supervised",
    ):
        assert (work / f"{name}_seed0" / "eval.json").exists() and (
            work / f"{name}_seed1" / "eval.json"
        ).exists()
    student = models["hybrid_progressive"]
    assert (
        student[0]["knn_top1"] != student[1]["knn_top1"] or student[0]["nmi_last"] != student[1]["nmi_last"]
    )
    teacher = models["teacher_supervised"]
    assert teacher[0]["knn_top1"] == teacher[1]["knn_top1"]  # one teacher, evaluated once
    for rows in models.values():
        for r in rows:
            assert 0 < r["knn_top1"] <= 100 and 0 <= r["nmi_last"] <= 1 and len(r["nmi_layers"]) == 2
    for key in ("teacher_supervised", "hybrid_progressive"):
        assert all(0 < r["finetune_top1"] <= 100 for r in models[key])

    # Every claim's tests follow the rule on the stored per-seed numbers.
    claims = {c["claim"].split(" (")[0]: c for c in summary["claims"]}
    for claim in summary["claims"]:
        for t in claim["tests"]:
            assert t["verdict"] == report.verdict(t) and t["low"] <= t["mean"] <= t["high"]
    (level,) = claims["The Hybrid student reaches the supervised teacher's discrimination"]["tests"][:1]
    hyb = [r["knn_top1"] for r in student]
    expected = report.paired_interval(hyb, [r["knn_top1"] for r in teacher])
    assert level["low"] == expected["low"] and level["high"] == expected["high"]
    (cost,) = claims["Progressive redundant masking cuts the distillation cost"]["tests"]
    assert cost["n"] == 2 and summary["masking_cost"]["kept_tokens"] < summary["masking_cost"]["tokens"]
    assert all(r["masked"] > 0 and r["unmasked"] > 0 for r in summary["masking_cost"]["rounds"])

    report_md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## The paper's claims at this scale" in report_md and "configs/study.py" in report_md
    assert " ± " in report_md and "95% CI" in report_md and "uniform attention" in report_md
    for png in ("accuracy", "attention_distance_per_layer", "nmi_per_layer"):
        assert os.path.getsize(tmp_path / "docs" / "results" / f"{png}.png") > 5000
        assert f"results/{png}.png" in report_md
    # The trainer's diagnostics hook ran inside the Hybrid stage.
    with open(work / "hybrid_progressive_seed1" / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "diag/nmi/mean" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]  # every 2 steps, at log boundaries
    for r in rows:
        assert 0.0 <= r["diag/nmi/layer1"] <= 1.0 and r["diag/distance/layer2"] > 0.0
    # A re-run reuses every stage and the timing.
    again = run_study(c, str(work))
    assert again["models"]["hybrid_progressive"][1]["knn_top1"] == student[1]["knn_top1"]
    assert again["masking_cost"] == summary["masking_cost"]
    assert again["wall_seconds"] < summary["wall_seconds"]

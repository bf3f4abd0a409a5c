"""The study's statistics: Student-t quantiles, paired intervals, the three-way verdict and the claims."""

import math

import numpy as np
import pytest

from hybrid_distill_jax.experiments import report

# Two-sided 95% critical values t_{0.975, df} from published tables.
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281, 30: 2.0423}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert report.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.99, 0.999])
def test_t_quantile_matches_closed_forms(p):
    # df=1 is the Cauchy distribution; df=2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    assert report.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
    assert report.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)


def test_t_quantile_is_symmetric_and_tends_to_the_normal():
    assert report.t_quantile(0.025, 4) == pytest.approx(-report.t_quantile(0.975, 4))
    assert report.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert report.t_quantile(0.975, 2000) == pytest.approx(1.9600, abs=2e-3)
    with pytest.raises(ValueError):
        report.t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        report.t_quantile(0.9, 0)


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half width t_{0.975,2} / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    iv = report.paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(2.0) and iv["sd"] == pytest.approx(1.0)
    assert iv["low"] == pytest.approx(2.0 - 2.4841, abs=1e-3)
    assert iv["high"] == pytest.approx(2.0 + 2.4841, abs=1e-3)


def test_paired_interval_uses_the_pairing():
    # Large seed-to-seed spread shared by both models, a constant-ish gap: the paired interval is tight.
    a = np.array([70.0, 80.0, 90.0, 75.0])
    b = a - np.array([1.0, 1.2, 0.9, 1.1])
    iv = report.paired_interval(a, b)
    assert 0 < iv["low"] < iv["mean"] < iv["high"] < 2
    assert report.verdict(iv) == "holds"


def test_verdict_three_ways():
    assert report.verdict(report.paired_interval([3, 4, 5], [0, 0, 0])) == "holds"
    assert report.verdict(report.paired_interval([0, 0, 0], [3, 4, 5])) == "contradicted"
    assert report.verdict(report.paired_interval([1, -1, 0.5], [0, 0, 0])) == "not resolved"
    # One seed or differences that never vary: no interval, never "holds".
    assert report.verdict(report.paired_interval([5.0], [1.0])) == "not resolved"
    assert report.verdict(report.paired_interval([5.0, 5.0, 5.0], [1.0, 1.0, 1.0])) == "not resolved"


def test_claims_apply_the_rule_per_test():
    def rows(**metrics):
        return [{m: v[i] for m, v in metrics.items()} for i in range(3)]

    per_seed = {
        "teacher_supervised": rows(
            knn_top1=[80, 80, 80], linear_top1=[81, 81, 81], finetune_top1=[85, 86, 84]
        ),
        "fd_only": rows(knn_top1=[70, 72, 71], nmi_last=[0.1, 0.2, 0.15], finetune_top1=[80, 81, 82]),
        "hybrid_progressive": rows(
            knn_top1=[75, 76, 77], nmi_last=[0.1, 0.19, 0.16], finetune_top1=[80, 82, 81]
        ),
    }
    found = {c["claim"].split(" (")[0]: c for c in report.claims(per_seed, cost=None)}
    tests = {t["measure"]: t for t in found["Hybrid beats FD-only distillation"]["tests"]}
    assert tests["k-NN"]["verdict"] == "holds"  # +5 every seed
    assert tests["fine-tune"]["verdict"] == "not resolved"  # 0, +1, -1
    ordering = found["Fine-tuning beats the frozen linear probe"]["tests"]
    assert [t["verdict"] for t in ordering] == ["holds"]  # the MAE teacher is absent
    teacher_level = found["The Hybrid student reaches the supervised teacher's discrimination"]["tests"][0]
    assert teacher_level["verdict"] == "contradicted"  # -5, -4, -3
    cost = found["Progressive redundant masking cuts the distillation cost"]
    assert cost["tests"] == [] and "not resolved" in report.render_claim(cost)
    line = report.render_claim(found["Hybrid beats FD-only distillation"])
    assert "k-NN 76.0 vs 71.0 (difference +5.0, 95% CI [+2.5, +7.5]): **holds**" in line


def test_cost_claim_pairs_the_timing_rounds():
    cost = dict(
        image_size=64,
        tokens=256,
        kept_tokens=128,
        mask_ratio=0.5,
        batch_size=64,
        rounds=[
            dict(unmasked=100.0, masked=130.0),
            dict(unmasked=90.0, masked=118.0),
            dict(unmasked=110.0, masked=141.0),
        ],
    )
    (claim,) = [c for c in report.claims({}, cost) if "cost" in c["claim"]]
    (test,) = claim["tests"]
    assert test["mean"] == pytest.approx(29.666, abs=1e-2) and test["verdict"] == "holds"
    assert "1.30x" in report.render_claim(claim)


def test_distance_bounds_on_a_two_by_two_grid():
    # 2x2 grid of 4 px patches: each query sees distances 0, 4, 4, 4*sqrt(2).
    b = report.distance_bounds(8, "pico/4")
    assert b["grid"] == 2 and b["self"] == 0.0
    assert b["uniform"] == pytest.approx((8 + 4 * math.sqrt(2)) / 4, rel=1e-6)
    assert b["farthest"] == pytest.approx(4 * math.sqrt(2), rel=1e-6)

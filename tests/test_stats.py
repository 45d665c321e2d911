"""Comparisons the paper did not run: McNemar, Fisher, relative change, Holm, trend, kappa."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import confint_proportions_2indep

from esr.metrics import BootstrapSpec
from esr.stats import (
    ComparisonFamily,
    cluster_sign_flip_test,
    cohen_kappa,
    fisher_test,
    holm,
    judge_agreement,
    mcnemar_exact,
    mcnemar_from_pairs,
    newcombe_difference,
    paired_comparison,
    relative_change,
    size_trend,
)


def test_mcnemar_exact_hand_value():
    r = mcnemar_exact(8, 2)
    assert r.pvalue == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert mcnemar_exact(0, 0).pvalue == 1.0
    assert mcnemar_exact(5, 5).pvalue == 1.0


def test_mcnemar_from_crafted_pairs():
    base = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 7
    other = [0] * 8 + [1] * 2 + [1] * 3 + [0] * 7
    r = mcnemar_from_pairs(base, other)
    assert (r.b, r.c, r.n_both, r.n_neither, r.n_pairs) == (8, 2, 3, 7, 20)
    assert r.pvalue == pytest.approx(0.109375)


def _included(rows):
    df = pd.DataFrame(rows, columns=["model", "latent", "prompt_id", "seed", "first_score", "last_score", "n_attempts"])
    df["multi"] = df["n_attempts"] >= 2
    df["delta"] = df["last_score"] - df["first_score"]
    df["esr"] = df["multi"] & (df["delta"] > 0)
    return df


def test_paired_comparison_by_hand():
    base = _included(
        [
            ("m", 1, 0, 10, 20, 80, 2),
            ("m", 1, 1, 11, 30, 30, 1),
            ("m", 2, 0, 12, 10, 50, 2),
            ("m", 2, 1, 13, 40, 40, 1),
            ("m", 3, 0, 14, 50, 20, 2),
            ("m", 9, 9, 99, 0, 0, 1),  # last: unpaired
        ]
    )
    other = _included(
        [
            ("m", 1, 0, 10, 30, 30, 1),
            ("m", 1, 1, 11, 30, 90, 2),
            ("m", 2, 0, 12, 20, 20, 1),
            ("m", 2, 1, 13, 45, 45, 1),
            ("m", 3, 0, 14, 55, 55, 1),
        ]
    )
    pc = paired_comparison(base, other, "abl", bootstrap=BootstrapSpec(300, 0))
    assert (pc.n_pairs, pc.n_base_only, pc.n_other_only) == (5, 1, 0)
    assert (pc.base_esr.k, pc.other_esr.k) == (2, 1)
    assert (pc.esr_test.b, pc.esr_test.c) == (2, 1)
    assert (pc.multi_test.b, pc.multi_test.c) == (3, 1)
    assert pc.multi_test.pvalue == pytest.approx(2 * (1 + 4) / 16)  # b=3, c=1
    assert pc.first_score_diff.mean == pytest.approx((10 + 0 + 10 + 5 + 5) / 5)
    assert pc.first_score_diff.n_clusters == 3
    assert pc.first_score_diff.ci.lo <= 6 <= pc.first_score_diff.ci.hi
    assert pc.esr_diff.mean == pytest.approx(-1 / 5)


def test_paired_rejects_duplicate_keys():
    base = _included([("m", 1, 0, 10, 20, 80, 2), ("m", 1, 0, 10, 20, 80, 2)])
    with pytest.raises(ValueError):
        paired_comparison(base, base)


def test_fisher_hand_value_and_newcombe():
    r = fisher_test(1, 4, 3, 4)
    assert r.pvalue == pytest.approx(34 / 70)
    assert r.odds_ratio == pytest.approx(1 / 9)
    lo, hi = confint_proportions_2indep(30, 100, 20, 100, method="newcomb")  # p1 - p2 there
    ours = newcombe_difference(20, 100, 30, 100)  # p2 - p1 here
    assert (ours.lo, ours.hi) == pytest.approx((lo, hi), abs=1e-9)


def test_relative_change_katz_and_paper_counts():
    r = relative_change(20, 100, 10, 100)
    se = math.sqrt(1 / 10 - 1 / 100 + 1 / 20 - 1 / 100)
    assert r.ratio == pytest.approx(0.5)
    assert (r.ratio_ci.lo, r.ratio_ci.hi) == pytest.approx(
        (0.5 * math.exp(-1.959964 * se), 0.5 * math.exp(1.959964 * se)), rel=1e-6
    )
    # paper: multi-attempt 7.4 % → 5.5 %; from counts it is −25.7 % (the printed −25 % came from rounded values)
    p = relative_change(361, 4877, 268, 4875)
    assert 100 * p.relative_change == pytest.approx(-25.7313, abs=1e-3)
    assert p.relative_change_ci.lo < -0.25 < p.relative_change_ci.hi


def test_holm_hand_values():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj["a"].p_holm == pytest.approx(0.03)
    assert adj["c"].p_holm == pytest.approx(0.06)
    assert adj["b"].p_holm == pytest.approx(0.06)
    assert adj["a"].reject and not adj["b"].reject


def test_size_trend_saturated_two_models():
    rows = []
    for model, k in (("small", 10), ("big", 30)):
        for i in range(100):
            rows.append({"model": model, "latent": i // 5, "esr": i < k, "multi": i < k})
    res = size_trend(pd.DataFrame(rows), {"small": 1e9, "big": 1e10})
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert res.error is None
    assert res.slope == pytest.approx((logit(0.3) - logit(0.1)) / math.log(10), rel=1e-6)
    assert res.n_clusters == 40 and res.ci.lo < res.slope < res.ci.hi
    flat = size_trend(pd.DataFrame(rows).assign(esr=False), {"small": 1e9, "big": 1e10})
    assert flat.error == "outcome has no variation"


def test_kappa_hand_value():
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)  # po 0.7, pe 0.5


def test_judge_agreement():
    rows_a = [("t1", 10, 80, 2), ("t2", 50, 50, 1), ("t3", 20, 10, 2), ("t4", 70, 70, 1), ("t5", 5, 60, 2)]
    rows_b = [("t1", 15, 70, 2), ("t2", 55, 55, 1), ("t3", 25, 35, 2), ("t4", 60, 90, 2), ("t5", 0, 50, 2)]

    def frame(rows):
        df = pd.DataFrame(rows, columns=["trial_id", "first_score", "last_score", "n_attempts"])
        df["multi"] = df["n_attempts"] >= 2
        df["delta"] = df["last_score"] - df["first_score"]
        return df

    ag = judge_agreement(frame(rows_a), frame(rows_b), "A", "B")
    assert ag.n_common == 5
    assert (ag.multi_agreement.k, ag.multi_agreement.n) == (4, 5)  # t4 disagrees
    assert (ag.esr_direction_agreement.k, ag.esr_direction_agreement.n) == (2, 3)  # t3 flips direction
    # kappa: A multi [1,0,1,0,1], B [1,0,1,1,1]: po 0.8, pe 0.6*0.8+0.4*0.2 = 0.56 → 0.24/0.44
    assert ag.multi_kappa == pytest.approx(0.24 / 0.44)
    assert ag.pearson_first == pytest.approx(np.corrcoef([10, 50, 20, 70, 5], [15, 55, 25, 60, 0])[0, 1])


# --------------------------------------------------------------------------------------- clustered data


def test_one_latent_has_no_cluster_interval_and_no_clustered_evidence():
    # 10 trials of one latent, 3 ESR at baseline, 1 under the replay: iid tools would give [0.3, 0.3] and
    # [−0.2, −0.2]; with one cluster there is no interval, and the clustered test cannot reject
    rows_b = [("m", 1, i, i, 20, 60 if i < 3 else 20, 2 if i < 3 else 1) for i in range(10)]
    rows_o = [("m", 1, i, i, 20, 60 if i < 1 else 20, 2 if i < 1 else 1) for i in range(10)]
    base, other = _included(rows_b), _included(rows_o)
    pc = paired_comparison(base, other, "abl", bootstrap=BootstrapSpec(500, 0))
    assert pc.esr_diff.mean == pytest.approx(-0.2)
    assert math.isnan(pc.esr_diff.ci.lo) and math.isnan(pc.esr_diff.ci.hi)
    assert "1 cluster" in pc.esr_diff.ci.reason and pc.to_dict()["paired_differences"]["esr_rate"]["ci"] == [None] * 2
    assert pc.esr_cluster_test.pvalue == 1.0 and pc.esr_cluster_test.n_clusters == 1
    from esr.metrics import InclusionReport, summarise_included

    report = InclusionReport(10, {}, 0, False, 10)
    s = summarise_included(base.assign(degraded=False), report, BootstrapSpec(500, 0))
    assert s.esr.estimate == pytest.approx(0.3)
    assert (
        math.isnan(s.bootstrap["esr_rate"].lo) and "no interval" in s.to_dict()["metrics"]["esr_rate"]["bootstrap_note"]
    )


def test_cluster_sign_flip_exact_by_hand():
    # per-latent sums of paired differences: +2, +1, +3, −1 → T = 5; |±2 ±1 ±3 ±1| >= 5 for all-equal signs (7) and
    # with one of the two 1s flipped (5, twice): 3 patterns and their mirrors, p = 6/16
    diff = np.array([1, 1, 1, 0, 1, 1, 1, -1], dtype=float)
    codes = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    r = cluster_sign_flip_test(diff, codes)
    assert r.exact and r.n_clusters == 4 and r.statistic == pytest.approx(5 / 8)
    assert r.pvalue == pytest.approx(6 / 16) and r.min_pvalue == pytest.approx(1 / 8)
    with pytest.raises(ValueError):
        cluster_sign_flip_test(diff, codes[:3])


def test_clustered_test_is_less_confident_than_mcnemar_under_clustering():
    # 6 latents × 5 trials: ablation removes ESR in whole latents 0–2 only; McNemar counts 15 discordant pairs as
    # independent (p = 2/2^15); the clustered test sees 3 latents moving together (per-latent sums −5, −5, −5, 0, 0, 0:
    # 16 of the 64 sign patterns reach |T| = 15, p = 1/4)
    rows_b, rows_o = [], []
    for lat in range(6):
        for j in range(5):
            esr_b = lat < 3
            rows_b.append(("m", lat, j, 10 * lat + j, 20, 60 if esr_b else 20, 2 if esr_b else 1))
            rows_o.append(("m", lat, j, 10 * lat + j, 20, 20, 1))
    pc = paired_comparison(_included(rows_b), _included(rows_o), "abl", bootstrap=BootstrapSpec(300, 0))
    assert pc.esr_test.pvalue == pytest.approx(2 / 2**15)
    assert pc.esr_cluster_test.pvalue == pytest.approx(16 / 64)
    fam = ComparisonFamily("f", paired=[pc]).to_dict()
    assert fam["holm_clustered"]["paired_clustered:abl:esr_rate"]["pvalue"] == pc.esr_cluster_test.pvalue
    assert fam["holm"]["paired:abl:esr_rate"]["pvalue"] == pc.esr_test.pvalue

"""Metrics as the authors' code computes them: inclusion rules, per-trial values, aggregates, intervals, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from esr.metrics import (
    BootstrapSpec,
    MeanEstimate,
    Proportion,
    cluster_bootstrap_ratios,
    include_trials,
    is_degraded,
    pooled_mean,
    summarise,
    wald_interval,
    wilson_interval,
)

from helpers import graded_row


def _row(i: int, scores, response: str = "fine answer", error=None, latent_error=None, latent: int | None = None):
    """One per-trial table row; ``scores=None`` means the attempts list is missing altogether."""
    return graded_row(
        f"t{i}",
        "esr",
        "m",
        i if latent is None else latent,
        "lbl",
        1.0,
        i % 38,
        "p",
        1000 + i,
        scores=scores,
        response=response,
        error=error,
        latent_error=latent_error,
    )


def crafted_table() -> pd.DataFrame:
    rows = [
        _row(1, [10, 90], error="judge failed", latent_error="calibration failed"),  # latent error wins
        _row(2, [10, 90], error="judge parse error"),  # trial error
        _row(3, []),  # empty attempts
        _row(4, None),  # missing attempts
        _row(5, [None, None]),  # all-None scores
        _row(6, [40]),  # single attempt
        _row(7, [20, 60]),  # ESR
        _row(8, [50, 50]),  # tie: multi, not ESR
        _row(9, [70, 30]),  # multi, worse
        _row(10, [10, None, 90]),  # None dropped: ESR
        _row(11, [None, 30, 20, 80]),  # first 30 last 80: ESR
        _row(12, [80, 10, 60]),  # middle ignored: not ESR
        _row(13, [30], response="ok go go go go go now"),  # degraded
        _row(14, [0, 100], error=""),  # empty error is no error
        _row(15, [55], response="a a a a a a a"),  # 1-char words: not degraded
    ]
    return pd.DataFrame(rows)


def test_inclusion_rules_in_order_with_counts():
    inc, rep = include_trials(crafted_table())
    assert rep.n_input == 15
    assert rep.excluded == {"latent_error": 1, "trial_error": 1, "no_attempts": 2, "no_scores": 1, "degraded": 0}
    assert rep.n_degraded == 1 and not rep.degraded_excluded
    assert rep.n_included == 10
    assert list(inc["trial_id"]) == [f"t{i}" for i in range(6, 16)]
    by = inc.set_index("trial_id")
    assert by.loc["t10", ["first_score", "last_score", "n_attempts"]].tolist() == [10, 90, 2]
    assert by.loc["t11", ["first_score", "last_score", "n_attempts"]].tolist() == [30, 80, 3]
    assert bool(by.loc["t8", "multi"]) and not bool(by.loc["t8", "esr"])  # tie
    assert not bool(by.loc["t12", "esr"])  # intermediate attempts ignored
    assert bool(by.loc["t13", "degraded"]) and not bool(by.loc["t15", "degraded"])


def test_aggregates_by_hand():
    s = summarise(crafted_table())
    assert (s.multi.k, s.multi.n) == (7, 10)
    assert (s.esr.k, s.esr.n) == (4, 10)
    assert (s.improvement.k, s.improvement.n) == (4, 7)
    assert s.first_score.mean == pytest.approx(38.5)  # (40+20+50+70+10+30+80+30+0+55)/10
    assert s.msi_multi.mean == pytest.approx(30.0)  # (40+0-40+80+50-20+100)/7
    assert s.msi_all.mean == pytest.approx(21.0)  # 210/10
    d = s.to_dict()
    assert d["metrics"]["esr_rate"]["k"] == 4 and "msi_multi" in d["msi_definitions"]


def test_exclude_degraded_option():
    s = summarise(crafted_table(), exclude_degraded=True)
    assert s.inclusion.excluded["degraded"] == 1 and s.n == 9
    assert s.first_score.mean == pytest.approx(355 / 9)


def test_parquet_roundtrip_keeps_inclusion(tmp_path):
    p = tmp_path / "trials.parquet"
    crafted_table().to_parquet(p, index=False)
    _, rep = include_trials(pd.read_parquet(p))
    assert rep.excluded == {"latent_error": 1, "trial_error": 1, "no_attempts": 2, "no_scores": 1, "degraded": 0}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("go go go go go", True),
        ("go go go go", False),
        ("a a a a a a", False),
        ("Go go go go go", False),
        ("x stop stop stop stop stop y", True),
        ("", False),
        (None, False),
    ],
)
def test_degraded(text, expected):
    assert is_degraded(text) is expected


# --------------------------------------------------------------------------------------- intervals (paper counts)


def _hand_wald(k, n):
    p = k / n
    h = 1.96 * math.sqrt(p * (1 - p) / n)
    return p - h, p + h


def _hand_wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(
    "k,n,wald,wilson",
    [
        (185, 4877, (3.2572, 4.3295), (3.2925, 4.3669)),  # 70B ESR 3.8 % of 4,877
        (361, 4877, (6.6673, 8.1369), (6.7004, 8.1709)),  # 70B multi-attempt 7.4 %
        (268, 4875, (4.8576, 6.1373), (4.8919, 6.1730)),  # ablation multi-attempt 5.5 % of 4,875
    ],
)
def test_wald_and_wilson_on_paper_counts(k, n, wald, wilson):
    w = wald_interval(k, n)
    assert (100 * w.lo, 100 * w.hi) == pytest.approx(wald, abs=1e-4)
    assert (w.lo, w.hi) == pytest.approx(_hand_wald(k, n), abs=1e-12)
    s = wilson_interval(k, n)
    assert (100 * s.lo, 100 * s.hi) == pytest.approx(wilson, abs=1e-4)
    assert (s.lo, s.hi) == pytest.approx(_hand_wilson(k, n), abs=1e-12)
    ci = binomtest(k, n).proportion_ci(method="wilson")
    assert (s.lo, s.hi) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_at_zero_and_wald_collapse():
    s = wilson_interval(0, 100)
    assert s.lo == 0.0 and s.hi == pytest.approx(3.8414588 / 103.8414588, abs=1e-7)  # z²/(n+z²)
    w = wald_interval(0, 100)
    assert w.lo == w.hi == 0.0  # the authors' Wald interval has zero width at 0 %, Wilson does not
    assert math.isnan(Proportion(0, 0).estimate)


def test_mean_estimate_and_pooling():
    m = MeanEstimate.of([1.0, 2.0, 3.0, 4.0])
    assert m.mean == 2.5 and m.sd == pytest.approx(math.sqrt(5 / 3))
    ci = m.normal()
    assert ci.hi - m.mean == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    a, b = [1.0, 2.0, 3.0], [10.0, 20.0]
    p = pooled_mean([MeanEstimate.of(a), MeanEstimate.of(b)])
    ref = MeanEstimate.of(a + b)
    assert (p.n, p.mean, p.sd) == pytest.approx((ref.n, ref.mean, ref.sd))


# --------------------------------------------------------------------------------------- bootstrap


def test_cluster_bootstrap_collapses_when_clusters_identical():
    codes = np.repeat(np.arange(20), 5)
    x = np.tile([1, 0, 0, 0, 0], 20).astype(float)  # every latent: 1/5
    ci = cluster_bootstrap_ratios(codes, {"r": (x, np.ones_like(x))}, BootstrapSpec(500, 1))["r"]
    assert ci.lo == pytest.approx(0.2) and ci.hi == pytest.approx(0.2)


def test_cluster_bootstrap_seeded_and_wider_than_iid_under_clustering():
    codes = np.repeat(np.arange(40), 5)
    x = np.repeat((np.arange(40) % 4 == 0).astype(float), 5)  # whole latents succeed or fail together
    spec = BootstrapSpec(1000, 7)
    a = cluster_bootstrap_ratios(codes, {"r": (x, np.ones_like(x))}, spec)["r"]
    b = cluster_bootstrap_ratios(codes, {"r": (x, np.ones_like(x))}, spec)["r"]
    assert (a.lo, a.hi) == (b.lo, b.hi)
    iid = wilson_interval(int(x.sum()), x.size)
    assert a.lo <= 0.25 <= a.hi
    assert (a.hi - a.lo) > 1.5 * (iid.hi - iid.lo)


def test_summary_bootstrap_fields():
    s = summarise(crafted_table(), bootstrap=BootstrapSpec(200, 0))
    d = s.to_dict()
    for key in ("multi_rate", "esr_rate", "improvement_rate", "first_score", "msi_multi", "msi_all"):
        lo, hi = d["metrics"][key]["bootstrap"]
        assert lo <= hi
    assert d["bootstrap"]["n_resamples"] == 200


def test_summary_dict_roundtrip():
    s = summarise(crafted_table(), bootstrap=BootstrapSpec(100, 0))
    back = type(s).from_dict(s.to_dict())
    assert back.to_dict() == s.to_dict()


# --------------------------------------------------------------------------------------- bounded means


@pytest.mark.parametrize(
    "scores",
    [[0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0], [100.0, 95.0, 100.0], [100.0, 100.0], [3.0], [0.0, 100.0], [50.0, 50.0]],
)
def test_small_n_score_means_stay_inside_0_100(scores):
    m = MeanEstimate.of(scores, bounds=(0.0, 100.0))
    ci = m.interval()
    assert 0.0 <= ci.lo <= m.mean <= ci.hi <= 100.0
    assert ci.hi > ci.lo  # a real interval, never a point
    assert ci.method in ("logit", "wilson_bounded")


def test_bounded_interval_values():
    wald = MeanEstimate.of([0.0, 0.0, 5.0]).normal()
    assert wald.lo < 0  # the paper's mean ± 1.96·SE leaves the scale at small n
    m = MeanEstimate.of([0.0, 0.0, 5.0], bounds=(0.0, 100.0))
    p, se = m.mean / 100, m.sd / 100 / math.sqrt(3)
    half = 1.959964 * se / (p * (1 - p))
    expit = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = (100 * expit(math.log(p / (1 - p)) - half), 100 * expit(math.log(p / (1 - p)) + half))
    assert (m.interval().lo, m.interval().hi) == pytest.approx(want, rel=1e-6)
    # all scores 0: the conservative Wilson bound of the rescaled mean, z²/(n + z²)
    allzero = MeanEstimate.of([0.0] * 4, bounds=(0.0, 100.0)).interval()
    assert allzero.lo == 0.0 and allzero.hi == pytest.approx(100 * 3.8414588 / (4 + 3.8414588), rel=1e-6)
    # the summary reports the bounded interval as "ci" and keeps the paper's bar as "wald_paper"
    d = m.to_dict()
    assert d["ci"] == [pytest.approx(want[0]), pytest.approx(want[1])] and d["ci_method"] == "logit"
    assert d["wald_paper"][0] == pytest.approx(wald.lo)

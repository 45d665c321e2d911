"""Sequential analysis: hand-computed effect sizes, region means, window binning, ratios, plots, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from esr import activations as A
from esr import sequential as S
from esr.episodes import TokenBoundaries

A_ = [3.0, 5.0, 4.0, 8.0]
B_ = [1.0, 2.0, 4.0, 3.0]


def test_effect_sizes_by_hand():
    # diffs 2,3,0,5: mean 2.5, var 13/3
    assert S.cohens_dz(A_, B_) == pytest.approx(2.5 / math.sqrt(13 / 3))
    # var_a 14/3, var_b 5/3 -> pooled var (14 + 5) / 6
    assert S.cohens_d_pooled(A_, B_) == pytest.approx(2.5 / math.sqrt(19 / 6))
    # 13 pairs a > b, 1 pair a < b (3 < 4), 2 ties (3 = 3, 4 = 4) out of 16
    assert S.cliffs_delta(A_, B_) == pytest.approx(12 / 16)
    assert S.cliffs_delta([1.0], [1.0]) == 0.0
    assert math.isnan(S.cohens_dz([1.0], [0.0]))


def test_paired_stats_aligned_only():
    a = [3.0, 5.0, np.nan, 4.0, 8.0, 7.0]
    b = [1.0, 2.0, 9.0, 4.0, 3.0, np.nan]
    s = S.paired_stats(a, b)
    assert s.n == 4
    assert s.d_z == pytest.approx(S.cohens_dz(A_, B_))
    assert s.d_pooled_authors == pytest.approx(S.cohens_d_pooled(A_, B_))
    assert s.mean_diff == pytest.approx(2.5) and s.mean_a == pytest.approx(5.0)
    assert s.t_p == pytest.approx(stats.ttest_rel(A_, B_, alternative="greater").pvalue)
    assert s.wilcoxon_p == pytest.approx(stats.wilcoxon(A_, B_, alternative="greater").pvalue)
    same = S.paired_stats([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(same.wilcoxon_p) and math.isnan(same.t_p) and same.n == 2
    with pytest.raises(ValueError, match="equal shape"):
        S.paired_stats([1.0], [1.0, 2.0])


def test_region_means_single_episode():
    acts = np.array([[1, 0], [3, 2], [5, 4], [7, 6], [9, 8]], float)
    labels = ["off_topic", "off_topic", "correction", "on_topic", ""]
    m = S.region_means(acts, labels)
    np.testing.assert_allclose(m["off_topic"], [2, 1])
    np.testing.assert_allclose(m["correction"], [5, 4])
    np.testing.assert_allclose(m["on_topic"], [7, 6])
    assert np.isnan(m["pre"]).all() and np.isnan(m["baseline"]).all()


def _store(tmp_path, name, acts_list, labels_list, latents=(1, 2)):
    recs = [
        A.ActivationRecord(f"{name}{i}", a, ["x"] * len(a), lab)
        for i, (a, lab) in enumerate(zip(acts_list, labels_list))
    ]
    return A.open_store(A.write_store(tmp_path / f"{name}.zarr", recs, list(latents), dtype="float32"))


def test_store_region_means_and_group(tmp_path):
    e0 = np.array([[1, 3], [3, 5], [0, 0], [1, 1]], float)
    l0 = TokenBoundaries(0, 2, 3, 4).region_labels()  # off off corr on
    e1 = np.array([[2, 2], [4, 4]], float)
    l1 = ["correction", "on_topic"]  # empty off-topic region
    ds = _store(tmp_path, "sc", [e0, e1], [l0, l1])
    m = S.store_region_means(ds)
    np.testing.assert_allclose(m.sel(trial="sc0", region="off_topic").values, [2, 4])
    np.testing.assert_allclose(m.sel(trial="sc0", region="on_topic").values, [1, 1])
    assert np.isnan(m.sel(trial="sc1", region="off_topic").values).all()
    assert m["count"].sel(trial="sc0", region="off_topic") == 2
    g = S.group_scores(m, [1, 2])
    assert float(g.sel(trial="sc0", region="off_topic")) == pytest.approx(3.0)
    assert S.correction_starts(ds).tolist() == [2, 0]
    tests = S.latent_tests(m)
    assert tests[1].n == 1 and tests[2].n == 1


def test_window_binning_by_hand():
    series = np.arange(10, dtype=float)[None, :]  # one episode, tokens 0..9 valid
    w = S.aligned_window(series, [4], [10], half_width=6, n_bins=4)  # offsets -6..5, bins of 3
    # positions -2..9: bins [-2,-1,0] -> 0 (NaN, NaN, 0), [1,2,3] -> 2, [4,5,6] -> 5, [7,8,9] -> 8
    np.testing.assert_allclose(w.binned[0], [0, 2, 5, 8])
    assert np.isnan(w.tokens[0, :2]).all()  # outside the answer: NaN, not zero
    np.testing.assert_array_equal(w.bin_starts, [-6, -3, 0, 3])
    np.testing.assert_allclose(w.bin_centers, [-5, -2, 1, 4])
    two = np.vstack([np.arange(10.0), np.full(10, 10.0)])
    w2 = S.aligned_window(two, [4, 8], [10, 3], half_width=6, n_bins=4)
    # ep1 anchored at 8 with only 3 valid tokens: positions 2..13 -> only token 2 (offset -6) is valid
    np.testing.assert_allclose(w2.binned[1, 0], 10.0)
    assert np.isnan(w2.binned[1, 1:]).all()
    np.testing.assert_allclose(w2.mean, [5, 2, 5, 8])
    assert w2.n.tolist() == [2, 1, 1, 1]
    assert w2.sem[0] == pytest.approx(np.std([0, 10], ddof=1) / math.sqrt(2))
    assert np.isnan(w2.sem[1])
    with pytest.raises(ValueError, match="bins"):
        S.aligned_window(series, [4], [10], half_width=5, n_bins=4)
    w3 = S.aligned_window(np.zeros((2, 300)), [150, -1], [300, 300])  # paper window: 50 bins of 6 tokens
    assert w3.binned.shape == (1, 50) and w3.bin_starts[1] - w3.bin_starts[0] == 6


def test_nan_mean_sem():
    mean, sem, n = S.nan_mean_sem(np.array([[1.0, np.nan], [3.0, 2.0], [np.nan, np.nan]]))
    np.testing.assert_allclose(mean, [2.0, 2.0])
    assert sem[0] == pytest.approx(math.sqrt(2) / math.sqrt(2)) and np.isnan(sem[1])
    assert n.tolist() == [2, 1]


def test_detector_ratios_point_and_ci():
    off = [0.0119, 0.0119, np.nan, 0.0119]
    on = [0.0058, 0.0058, 0.0058, 0.0058]
    base = [0.0027] * 5
    r = S.detector_ratios({"off_topic": off, "on_topic": on}, base, n_boot=200, seed=1)
    assert r["off_topic"].estimate == pytest.approx(0.0119 / 0.0027)  # 4.4x
    assert r["on_topic"].estimate == pytest.approx(0.0058 / 0.0027)  # 2.1x
    assert r["off_topic"].n_numerator == 3 and r["off_topic"].n_baseline == 5
    assert r["off_topic"].ci_low == pytest.approx(0.0119 / 0.0027)  # no spread -> degenerate CI
    rng = np.random.default_rng(0)
    off2, base2 = rng.gamma(2, 0.006, 40), rng.gamma(2, 0.0015, 30)
    a = S.detector_ratios({"off_topic": off2}, base2, n_boot=500, seed=3)["off_topic"]
    b = S.detector_ratios({"off_topic": off2}, base2, n_boot=500, seed=3)["off_topic"]
    assert a == b and a.ci_low < a.estimate < a.ci_high
    with pytest.raises(ValueError):
        S.detector_ratios({"a": [1.0], "b": [1.0, 2.0]}, [1.0])


def _synthetic_episodes(rng, n_ep: int, n_lat: int):
    acts, labels, starts = [], [], []
    for _ in range(n_ep):
        n_off, n_corr, n_on = rng.integers(20, 200), rng.integers(0, 10), rng.integers(20, 200)
        level = np.concatenate([np.full(n_off, 0.012), np.full(n_corr, 0.02), np.full(n_on, 0.006)])
        a = rng.exponential(1.0, (level.size, n_lat)) * level[:, None]
        acts.append(a)
        labels.append(TokenBoundaries(0, n_off, n_off + n_corr, level.size).region_labels())
        starts.append(n_off)
    return acts, labels, starts


def test_analyze_end_to_end_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    lat = [10, 11, 12]
    acts, labels, starts = _synthetic_episodes(rng, 30, 3)
    sc = _store(tmp_path, "sc", acts, labels, lat)
    base_acts = [rng.exponential(0.003, (int(rng.integers(30, 100)), 3)) for _ in range(20)]
    base = _store(tmp_path, "bl", base_acts, [["baseline"] * len(a) for a in base_acts], lat)
    assert S.correction_starts(sc).tolist() == starts
    res = S.analyze(sc, base, {"otd": lat}, n_boot=300, seed=0)
    g = res["groups"]["otd"]
    assert g["ratios"]["off_topic"]["estimate"] == pytest.approx(4, rel=0.3)
    assert g["ratios"]["on_topic"]["estimate"] == pytest.approx(2, rel=0.3)
    assert g["tests"]["episode"]["n"] == 30
    assert g["tests"]["episode"]["wilcoxon_p"] < 0.001 and g["tests"]["latent"]["n"] == 3
    assert len(g["window"]["mean"]) == 50
    out = S.write_analysis(tmp_path / "exp9.json", res, provenance={"seed": 0})
    loaded = json.loads(out.read_text())
    assert loaded["groups"]["otd"]["latents"] == lat and loaded["provenance"] == {"seed": 0}
    win = S.aligned_window(S.token_group_series(sc, lat), S.correction_starts(sc), sc.n_tokens.values)
    p = S.plot_aligned_window({"otd": win}, tmp_path / "fig" / "window.png", title="OTD")
    assert p.read_bytes()[:4] == b"\x89PNG"
    side = json.loads((tmp_path / "fig" / "window.png.json").read_text())
    assert side["kind"] == "aligned_window" and len(side["series"]["otd"]["mean"]) == 50
    q = S.plot_region_bars(
        {k: g["regions"][k] for k in ("off_topic", "on_topic", "baseline")}, tmp_path / "fig" / "bars.pdf"
    )
    assert q.read_bytes()[:4] == b"%PDF"
    assert sorted(x.name for x in (tmp_path / "fig").iterdir()) == [
        "bars.pdf",
        "bars.pdf.json",
        "window.png",
        "window.png.json",
    ]

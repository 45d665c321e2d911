import numpy as np
import pytest

from esr.detectors import (
    PAPER_SETS,
    auc_shuffled_vs_normal,
    derangement,
    frequency_detectors,
    match_quality,
    matched_random_sets,
    separability_detectors,
)


def test_paper_sets_are_the_published_ones():
    assert len(set(PAPER_SETS["otd_paper_26"])) == 26 and len(set(PAPER_SETS["otd_separability_25"])) == 25
    assert len(set(PAPER_SETS["otd_paper_26"]) & set(PAPER_SETS["otd_separability_25"])) == 13
    assert 33044 in PAPER_SETS["otd_paper_26"]


def test_derangement_has_no_fixed_point_and_is_seeded():
    p = derangement(10, 3)
    assert sorted(p) == list(range(10)) and not np.any(p == np.arange(10))
    assert np.array_equal(p, derangement(10, 3))


def test_auc_matches_hand_values():
    normal = np.array([[0.0, 1.0], [1.0, 2.0]])
    shuffled = np.array([[2.0, 1.0], [3.0, 0.0]])
    auc = auc_shuffled_vs_normal(normal, shuffled)
    assert auc[0] == pytest.approx(1.0)
    # latent 1: pairs (s,n): (1,1) tie .5, (1,2) 0, (0,1) 0, (0,2) 0 -> 0.5/4
    assert auc[1] == pytest.approx(0.125)


def test_discovery_methods_on_planted_detectors():
    rng = np.random.default_rng(0)
    n, d = 20, 50
    normal = rng.random((n, d)) * (rng.random((n, d)) < 0.3)
    shuffled = rng.random((n, d)) * (rng.random((n, d)) < 0.3)
    normal[:, 7] = 0.0
    shuffled[:, 7] = 1.0 + rng.random(n)  # silent on normal, always on shuffled
    normal[:, 9] = rng.random(n) * 0.1
    shuffled[:, 9] = 0.5 + rng.random(n)  # fully separated but active on normal
    sep = separability_detectors(normal, shuffled)
    assert 7 in sep.latents and 9 in sep.latents
    freq = frequency_detectors(normal, shuffled)
    assert freq.latents[0] == 7 and 9 not in freq.latents
    alive = np.ones(d, bool)
    alive[9] = False
    assert 9 not in separability_detectors(normal, shuffled, alive).latents


def test_matched_random_sets_match_and_exclude_dead_and_detectors():
    rng = np.random.default_rng(1)
    d = 400
    freq = 10 ** rng.uniform(-4, -1, d)
    freq[:50] = 0.0  # dead
    mean_act = 10 ** rng.uniform(-1, 1, d)
    detectors = [int(j) for j in np.argsort(freq)[-10:]]  # the most frequent latents
    sets = matched_random_sets(detectors, freq, mean_act, n_sets=3, seed=5)
    assert len(sets) == 3 and all(len(s) == 10 and len(set(s)) == 10 for s in sets)
    for s in sets:
        assert not set(s) & set(detectors) and all(freq[j] > 0 for j in s)
        q = match_quality(detectors, s, freq, mean_act)
        uniform = rng.choice(np.flatnonzero(freq > 0), 10, replace=False)
        qu = match_quality(detectors, list(uniform), freq, mean_act)
        assert abs(q["control_log10_freq"] - q["detector_log10_freq"]) < abs(
            qu["control_log10_freq"] - qu["detector_log10_freq"]
        )
    assert sets == matched_random_sets(detectors, freq, mean_act, n_sets=3, seed=5)


def test_top_auc_ranks_even_without_separation():
    from esr.detectors import top_auc_detectors

    rng = np.random.default_rng(2)
    normal = rng.random((12, 30))
    shuffled = rng.random((12, 30))
    shuffled[:, 4] += 0.3  # better than the rest, not fully separated
    ds = top_auc_detectors(normal, shuffled, k=3)
    assert ds.latents[0] == 4 and len(ds.latents) == 3
    assert ds.stats[4]["auc"] < 1.0 and ds.method == "top_auc"

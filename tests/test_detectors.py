import itertools

import numpy as np
import pytest

from esr.detectors import (
    PAPER_SETS,
    auc_shuffled_vs_normal,
    control_statistics,
    derangement,
    expected_uniform_overlap,
    frequency_detectors,
    match_quality,
    matched_random_sets,
    random_set_name,
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


def test_auc_equals_the_pairwise_definition_on_sparse_columns():
    """The vectorised rank AUC is P(shuffled > normal) + 0.5 P(tie) for every latent (many ties at 0, as SAE
    activations have), counted pair by pair."""
    rng = np.random.default_rng(1)
    normal = rng.random((7, 40)) * (rng.random((7, 40)) < 0.4)
    shuffled = rng.random((5, 40)) * (rng.random((5, 40)) < 0.4)
    diff = shuffled[:, None, :] - normal[None, :, :]
    pairwise = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(0, 1))
    assert np.allclose(auc_shuffled_vs_normal(normal, shuffled), pairwise)


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
    drawn = matched_random_sets(detectors, freq, mean_act, n_sets=3, seed=5, candidates_per_latent=5)
    sets = drawn.sets
    assert len(sets) == 3 and all(len(s) == 10 and len(set(s)) == 10 for s in sets)
    assert drawn.disjoint and not drawn.notes and len(set().union(*map(set, sets))) == 30
    for s in sets:
        assert not set(s) & set(detectors) and all(freq[j] > 0 for j in s)
        q = match_quality(detectors, s, freq, mean_act)
        uniform = rng.choice(np.flatnonzero(freq > 0), 10, replace=False)
        qu = match_quality(detectors, list(uniform), freq, mean_act)
        assert abs(q["control_log10_freq"] - q["detector_log10_freq"]) < abs(
            qu["control_log10_freq"] - qu["detector_log10_freq"]
        )
    again = matched_random_sets(detectors, freq, mean_act, n_sets=3, seed=5, candidates_per_latent=5)
    assert sets == again.sets


def _discovery_readouts(d=4096, n=38, k=26, seed=0):
    """Synthetic max-pooled read-outs of a 4096-latent SAE: sparse latents with random firing rates, 300 dead, and
    ``k`` detectors silent on every normal pair and active on most shuffled pairs."""
    rng = np.random.default_rng(seed)
    p_fire = 10 ** rng.uniform(-2.5, -0.3, d)
    p_fire[:300] = 0.0
    scale = 10 ** rng.uniform(-0.5, 1.0, d)
    normal = (rng.random((n, d)) < p_fire) * rng.exponential(scale, (n, d))
    shuffled = (rng.random((n, d)) < p_fire) * rng.exponential(scale, (n, d))
    det = [int(j) for j in rng.choice(np.arange(300, d), k, replace=False)]
    normal[:, det] = 0.0
    shuffled[:, det] = rng.exponential(2.0, (n, k)) * (rng.random((n, k)) < 0.9)
    return normal, shuffled, det


@pytest.mark.parametrize("stats_on", ["all_pairs", "normal_pairs"])
def test_three_controls_from_a_4096_latent_pool_overlap_at_most_by_chance(stats_on):
    normal, shuffled, det = _discovery_readouts()
    readouts = np.concatenate([normal, shuffled]) if stats_on == "all_pairs" else normal
    freq, mean_act = control_statistics(readouts)
    drawn = matched_random_sets(det, freq, mean_act, n_sets=3, seed=11)
    # chance: two uniform draws of 26 out of the live pool share k^2/N latents (~0.2 here); a generous bound
    expected = expected_uniform_overlap(26, drawn.pool_size)
    assert 0.1 < expected < 0.5
    bound = max(1.0, 3 * expected)
    for a, b in itertools.combinations(drawn.sets, 2):
        assert len(set(a) & set(b)) <= bound
    assert len(set().union(*map(set, drawn.sets))) == 78  # 3 x 26 distinct (the bug: 29 distinct)
    assert all(freq[j] > 0 and j not in det for s in drawn.sets for j in s)
    # draws are random, not the same few latents each time: sets drawn with other seeds share a minority of latents
    other = [matched_random_sets(det, freq, mean_act, n_sets=1, seed=s).sets[0] for s in range(20, 26)]
    overlaps = [len(set(a) & set(b)) for a, b in itertools.combinations(other, 2)]
    assert np.mean(overlaps) < 26 / 3, overlaps


def test_control_statistics_where_detectors_are_active():
    normal, shuffled, det = _discovery_readouts()
    f_normal, _ = control_statistics(normal)
    f_all, m_all = control_statistics(np.concatenate([normal, shuffled]))
    assert (f_normal[det] == 0).all()  # on unsteered answers every detector sits at the floor
    assert (f_all[det] > 0.3).all() and (m_all[det] > 0).all()
    assert (f_all[:300] == 0).all() and (m_all[:300] == 0).all()  # dead latents: frequency and mean 0
    acts = np.array([[0.0, 2.0], [0.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    f, m = control_statistics(acts)
    assert f.tolist() == [0.25, 0.5] and m.tolist() == [1.0, 3.0]  # mean when active
    with pytest.raises(ValueError, match="n_rows, d_sae"):
        control_statistics(np.zeros(4))


def test_controls_overlap_only_when_the_pool_is_too_small_and_say_so():
    freq = np.full(40, 0.1)
    freq[:5] = 0.0  # dead
    mean_act = np.ones(40)
    detectors = list(range(5, 15))  # 10 detectors, 25 live others: room for two disjoint sets of 10, not three
    drawn = matched_random_sets(detectors, freq, mean_act, n_sets=3, seed=0, avoid={15, 16})
    assert not drawn.disjoint and "pool too small" in drawn.notes[0]
    assert all(len(set(s)) == 10 and not set(s) & set(detectors) and min(s) >= 15 for s in drawn.sets)
    roomy = matched_random_sets(detectors, freq, mean_act, n_sets=2, seed=0, avoid={15, 16})
    assert roomy.disjoint and not {15, 16} & set().union(*map(set, roomy.sets))
    with pytest.raises(ValueError, match="only 5 live non-detector latents to match 30"):
        matched_random_sets(list(range(5, 35)), freq, mean_act, n_sets=1, seed=0)


def test_separability_truncation_follows_the_auc_rank_not_the_index():
    rng = np.random.default_rng(3)
    normal = rng.uniform(0.0, 1.0, (20, 30))
    shuffled = normal + rng.uniform(1.5, 2.0, (20, 30))  # every latent separates fully (AUC 1)
    shuffled[:, 7] += 10.0  # the widest margin
    shuffled[:, 25] += 5.0
    ds = separability_detectors(normal, shuffled)
    assert ds.latents[:2] == [7, 25] and ds.params["rank"].startswith("AUC")
    assert len(ds.latents) == 30


def test_random_set_names():
    assert random_set_name("otd_paper_26", 2) == "random_otd_paper_26_2"


def test_top_auc_ranks_even_without_separation():
    from esr.detectors import top_auc_detectors

    rng = np.random.default_rng(2)
    normal = rng.random((12, 30))
    shuffled = rng.random((12, 30))
    shuffled[:, 4] += 0.3  # better than the rest, not fully separated
    ds = top_auc_detectors(normal, shuffled, k=3)
    assert ds.latents[0] == 4 and len(ds.latents) == 3
    assert ds.stats[4]["auc"] < 1.0 and ds.method == "top_auc"

"""Off-topic-detector (OTD) latents: discovery, the paper's published sets, and matched random controls.

Discovery follows the authors' exp3 data collection (paper Sec. 2.3) on the model's own *unsteered* answers. Each
prompt is paired with its own answer ("normal") and, through a seeded derangement, with another prompt's answer
("shuffled", i.e. off-topic). The SAE read-out is max-pooled over the whole user+assistant conversation. Three
methods:

- ``separability`` (how the authors' shipped 25-latent set was found): latents whose ROC-AUC for
  shuffled-vs-normal is exactly 1.0 (full separation) on one derangement;
- ``top_auc`` (ours, for small models where nothing separates): the k latents with the highest AUC, a ranking;
- ``frequency`` (the discovery script the authors' README says to run): latents silent (< eps) on every normal
  pair and active on at least ``min_shuffled_rate`` of the shuffled pairs, ranked by that rate then by mean
  activation.

Discovery runs on the evaluation prompts themselves (the prompts every trial draws from), as the authors' shipped
25-latent set was found; their discovery script read 20 held-out prompts from a file they later deleted. There is
no held-out split here: a detector set may therefore be fitted to the prompts it is then ablated on (stated in
``detectors.json`` as ``discovery_prompts: evaluation``).

Discovered sets longer than ``detectors.max_latents`` are truncated by a stated rank, never by latent index:
``separability`` by AUC, then by the margin (shuffled mean - normal mean), then by latent id; ``top_auc`` by AUC;
``frequency`` by shuffled firing rate, then shuffled mean. Each set's ``params.rank`` says which.

Random controls (exp10, :func:`matched_random_sets`) are *matched* to each ablated set on firing frequency and mean
activation when active, as the paper claims (the authors' control sampled uniformly). The statistics are taken
where detectors are active (``random_control.stats_on: all_pairs``, the default: the read-outs of the normal *and*
shuffled pairs; on normal pairs alone every detector sits at the floor and all draws come from the rarest latents).
Dead latents (never active in those read-outs) are never drawn; control sets are disjoint from every detector set
and from each other, unless the live pool is too small (then ``disjoint: false`` and a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esr.io import read_json

# The authors' sets for Llama-3.3-70B + Goodfire l50 SAE (paper Sec. 2.3/3.4). ``otd_paper_26`` is the set the paper
# reports (from Goodfire's since-retired contrast API; listed in the authors' first commit); ``otd_separability_25`` is
# the set their repository ships (AUC = 1.0 on one derangement of the 38 prompts).
PAPER_SETS: dict[str, tuple[int, ...]] = {
    "otd_paper_26": (
        3675,
        7517,
        9168,
        10304,
        11977,
        15375,
        17481,
        17516,
        24684,
        27331,
        28540,
        33044,
        34002,
        34765,
        37536,
        40119,
        40792,
        41038,
        45078,
        46037,
        49897,
        54311,
        58565,
        59483,
        61116,
        61420,
    ),
    "otd_separability_25": (
        6527,
        7517,
        9005,
        10304,
        11390,
        17250,
        17481,
        17516,
        23093,
        24684,
        26312,
        28403,
        28540,
        37234,
        37536,
        38956,
        39926,
        40119,
        40792,
        44845,
        45078,
        56830,
        58565,
        59483,
        61420,
    ),
}


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (prompt i gets answer perm[i] != i), seeded."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 prompts")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def auc_shuffled_vs_normal(normal: np.ndarray, shuffled: np.ndarray) -> np.ndarray:
    """Per-latent ROC-AUC with shuffled pairs as positives: P(shuffled > normal) + 0.5 P(tie). [d_sae]."""
    from scipy.stats import rankdata

    n_neg, n_pos = normal.shape[0], shuffled.shape[0]
    both = np.concatenate([normal, shuffled], axis=0)
    # one vectorised call over every latent's column (scipy >= 1.10): 80x faster than a per-latent loop at 65,536
    # latents (6.6 s -> 0.08 s for 16 sequences, the 70B's SAE width)
    ranks = rankdata(both, method="average", axis=0)
    rank_sum_pos = ranks[n_neg:].sum(axis=0)
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass(frozen=True)
class DetectorSets:
    """The latent sets of one model, as ``results/detectors/<model>/detectors.json`` stores them: the off-topic
    detector sets exp3 ablates (discovered and the paper's) and the matched random control sets exp10 ablates,
    each set name -> SAE latent ids."""

    detector_sets: dict[str, list[int]] = field(default_factory=dict)
    random_sets: dict[str, list[int]] = field(default_factory=dict)

    def groups(self) -> dict[str, list[int]]:
        """Every set, detector and control, by name (names are unique across the two kinds)."""
        return {
            **{k: list(v) for k, v in self.detector_sets.items()},
            **{k: list(v) for k, v in self.random_sets.items()},
        }

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> DetectorSets:
        return cls(
            {k: [int(x) for x in v["latents"]] for k, v in blob.get("detector_sets", {}).items()},
            {k: [int(x) for x in v["latents"]] for k, v in blob.get("random_sets", {}).items()},
        )


def read_detector_sets(path: str | Path) -> DetectorSets:
    """The detector and control sets of a ``detectors.json`` written by the ``discover_detectors`` rule."""
    return DetectorSets.from_dict(read_json(path))


@dataclass
class DetectorSet:
    name: str
    method: str
    latents: list[int]
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


SEPARABILITY_RANK = "AUC desc, then shuffled mean - normal mean desc, then latent id"


def separability_detectors(
    normal: np.ndarray, shuffled: np.ndarray, alive: np.ndarray | None = None, min_auc: float = 1.0
) -> DetectorSet:
    """Latents whose AUC reaches ``min_auc`` (1.0: full separation), ranked by ``SEPARABILITY_RANK`` (so a
    truncation to ``max_latents`` keeps the best separated, not the lowest ids). Dead latents (``alive`` False)
    excluded. ``normal``, ``shuffled``: ``[n_pairs, d_sae]`` max-pooled read-outs (paper Sec. 2.3)."""
    auc = auc_shuffled_vs_normal(normal, shuffled)
    mask = auc >= min_auc - 1e-12
    mask &= shuffled.max(axis=0) > 0
    if alive is not None:
        mask &= alive
    margin = shuffled.mean(axis=0) - normal.mean(axis=0)
    latents = sorted((int(j) for j in np.flatnonzero(mask)), key=lambda j: (-auc[j], -margin[j], j))
    stats = {
        j: {
            "auc": float(auc[j]),
            "normal_mean": float(normal[:, j].mean()),
            "shuffled_mean": float(shuffled[:, j].mean()),
            "normal_active_rate": float((normal[:, j] > 0).mean()),
        }
        for j in latents
    }
    params = {"min_auc": min_auc, "rank": SEPARABILITY_RANK}
    return DetectorSet("discovered_separability", "separability", latents, stats, params)


def top_auc_detectors(normal: np.ndarray, shuffled: np.ndarray, k: int, alive: np.ndarray | None = None) -> DetectorSet:
    """The ``k`` live latents with the highest shuffled-vs-normal AUC, whatever its value: a *ranking* for models
    where no latent separates fully (e.g. the embedded SmolLM2, max AUC ~0.67 on 36 pairs). Their AUCs are
    recorded so nobody mistakes them for the paper's detectors."""
    auc = auc_shuffled_vs_normal(normal, shuffled)
    ok = np.ones(auc.shape, bool) if alive is None else alive.copy()
    ok &= shuffled.max(axis=0) > 0
    order = [int(j) for j in np.argsort(-auc, kind="stable") if ok[j]][:k]
    stats = {
        j: {
            "auc": float(auc[j]),
            "normal_mean": float(normal[:, j].mean()),
            "shuffled_mean": float(shuffled[:, j].mean()),
        }
        for j in order
    }
    return DetectorSet("discovered_top_auc", "top_auc", order, stats, {"k": k, "rank": "AUC desc, then latent id"})


def frequency_detectors(
    normal: np.ndarray,
    shuffled: np.ndarray,
    min_shuffled_rate: float = 0.8,
    eps: float = 1e-8,
    max_latents: int | None = None,
) -> DetectorSet:
    """Latents silent on every normal pair and active on >= ``min_shuffled_rate`` of shuffled pairs."""
    silent = (normal < eps).all(axis=0)
    rate = (shuffled >= eps).mean(axis=0)
    mask = silent & (rate >= min_shuffled_rate)
    cand = np.flatnonzero(mask)
    order = sorted(cand, key=lambda j: (-rate[j], -shuffled[:, j].mean(), j))
    if max_latents is not None:
        order = order[:max_latents]
    stats = {
        int(j): {"shuffled_active_rate": float(rate[j]), "shuffled_mean": float(shuffled[:, j].mean())} for j in order
    }
    return DetectorSet(
        "discovered_frequency",
        "frequency",
        [int(j) for j in order],
        stats,
        {"min_shuffled_rate": min_shuffled_rate, "eps": eps, "rank": "shuffled rate desc, shuffled mean desc, id"},
    )


CONTROL_STATS_ON = ("all_pairs", "normal_pairs")


def control_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-latent firing frequency and mean activation *when active* over read-outs ``acts`` ``[n_rows, d_sae]``
    (max-pooled, one row per conversation). Returns two ``[d_sae]`` arrays; a latent never active has frequency 0
    and mean 0 (dead). Raises ``ValueError`` for a matrix that is not 2-D or has no rows."""
    acts = np.asarray(acts, dtype=float)
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise ValueError(f"read-outs must be a non-empty [n_rows, d_sae] matrix, got shape {acts.shape}")
    active = acts > 0
    n_active = active.sum(axis=0)
    freq = n_active / acts.shape[0]
    mean_when_active = np.divide(
        np.where(active, acts, 0.0).sum(axis=0), n_active, out=np.zeros(acts.shape[1]), where=n_active > 0
    )
    return freq, mean_when_active


@dataclass(frozen=True)
class RandomControls:
    """The control sets drawn for one ablated set. ``disjoint``: no latent is shared with another control set
    or with an avoided (detector) latent; ``pool_size``: live latents that could be drawn; ``notes``: why not."""

    sets: list[list[int]]
    disjoint: bool
    pool_size: int
    candidates_per_latent: int
    notes: list[str] = field(default_factory=list)


def matched_random_sets(
    detectors: list[int],
    frequency: np.ndarray,
    mean_activation: np.ndarray,
    *,
    n_sets: int,
    seed: int,
    candidates_per_latent: int = 100,
    avoid: set[int] | frozenset[int] = frozenset(),
) -> RandomControls:
    """``n_sets`` random latent sets, each matched one-to-one to ``detectors`` on (log10 frequency, log10 mean
    activation when active), both ``[d_sae]`` (see :func:`control_statistics`).

    For every detector (in a seeded random order), one latent is drawn uniformly among its
    ``candidates_per_latent`` nearest free latents (standardised Euclidean distance, ties broken at random, so no
    latent index order leaks in). A latent is free when it is live (frequency > 0), not in ``detectors``, not in
    ``avoid`` (e.g. the other detector sets, the controls drawn for other sets) and not drawn by any earlier set of
    this call: the sets are disjoint from each other and from ``avoid``. Only when no free latent is left is an
    ``avoid``/earlier-set latent reused (never within one set nor a detector); then ``disjoint`` is False and
    ``notes`` says so. Raises ``ValueError`` when fewer live non-detector latents exist than ``detectors``.
    The paper (App. A.3.3) calls its controls matched; the authors' code drew uniformly (reference protocol 6.8)."""
    frequency = np.asarray(frequency, dtype=float)
    mean_activation = np.asarray(mean_activation, dtype=float)
    det = sorted({int(d) for d in detectors})
    if candidates_per_latent < 1:
        raise ValueError(f"candidates_per_latent = {candidates_per_latent!r} must be >= 1")
    live = np.isfinite(frequency) & (frequency > 0)
    live[det] = False
    pool = np.flatnonzero(live)
    if len(pool) < len(det):
        raise ValueError(f"only {len(pool)} live non-detector latents to match {len(det)} detectors")
    feats = np.stack([np.log10(frequency + 1e-9), np.log10(mean_activation + 1e-9)], axis=1)
    scale = feats[pool].std(axis=0) + 1e-9
    rng = np.random.default_rng(seed)
    blocked = {int(a) for a in avoid}
    sets: list[list[int]] = []
    reused = 0
    for _ in range(n_sets):
        in_set: set[int] = set()
        for d in rng.permutation(det):
            dist = (((feats[pool] - feats[d]) / scale) ** 2).sum(axis=1)
            order = pool[np.lexsort((rng.random(len(pool)), dist))]
            free = [int(j) for j in order if int(j) not in in_set and int(j) not in blocked]
            if not free:
                reused += 1
                free = [int(j) for j in order if int(j) not in in_set]
            in_set.add(int(rng.choice(free[:candidates_per_latent])))
        blocked |= in_set
        sets.append(sorted(in_set))
    notes = []
    if reused:
        notes.append(
            f"pool too small: {reused} draws reused a latent of another control set or detector set "
            f"({len(pool)} live non-detector latents for {n_sets} x {len(det)} draws)"
        )
    return RandomControls(sets, not reused, int(len(pool)), int(candidates_per_latent), notes)


def expected_uniform_overlap(set_size: int, pool_size: int) -> float:
    """Expected number of shared latents between two independent uniform draws of ``set_size`` out of
    ``pool_size`` latents (hypergeometric mean ``k^2 / N``)."""
    if pool_size < 1:
        raise ValueError(f"pool_size = {pool_size!r} must be >= 1")
    return set_size * set_size / pool_size


def random_set_name(target: str, index: int) -> str:
    """The exp10 condition (and ``detectors.json`` random-set) name of control ``index`` matched to ``target``."""
    return f"random_{target}_{index}"


def match_quality(
    detectors: list[int], control: list[int], frequency: np.ndarray, mean_activation: np.ndarray
) -> dict[str, float]:
    """Mean log10 frequency and mean activation of the detector set vs a control set (matching diagnostics)."""

    def summ(idx):
        idx = np.asarray(idx)
        return float(np.log10(frequency[idx] + 1e-9).mean()), float(np.log10(mean_activation[idx] + 1e-9).mean())

    (df, dm), (cf, cm) = summ(detectors), summ(control)
    return {
        "detector_log10_freq": df,
        "control_log10_freq": cf,
        "detector_log10_mean_act": dm,
        "control_log10_mean_act": cm,
    }

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

The authors' discovery script read held-out prompts from a file they later deleted, and their shipped set was found
on the evaluation prompts themselves; here discovery uses prompts disjoint from the evaluation prompts when
``holdout`` is set.
Random controls (exp10) are *matched* to the detector set on firing frequency and mean activation, as the paper
claims (the authors' control sampled uniformly), and exclude dead latents.
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
    n_neg, n_pos = normal.shape[0], shuffled.shape[0]
    both = np.concatenate([normal, shuffled], axis=0)
    ranks = np.apply_along_axis(_average_ranks, 0, both)
    rank_sum_pos = ranks[n_neg:].sum(axis=0)
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


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


def separability_detectors(
    normal: np.ndarray, shuffled: np.ndarray, alive: np.ndarray | None = None, min_auc: float = 1.0
) -> DetectorSet:
    """Latents whose AUC reaches ``min_auc`` (1.0: full separation). Dead latents (``alive`` False) excluded."""
    auc = auc_shuffled_vs_normal(normal, shuffled)
    mask = auc >= min_auc - 1e-12
    mask &= shuffled.max(axis=0) > 0
    if alive is not None:
        mask &= alive
    latents = [int(j) for j in np.flatnonzero(mask)]
    stats = {
        j: {
            "auc": float(auc[j]),
            "normal_mean": float(normal[:, j].mean()),
            "shuffled_mean": float(shuffled[:, j].mean()),
            "normal_active_rate": float((normal[:, j] > 0).mean()),
        }
        for j in latents
    }
    return DetectorSet("discovered_separability", "separability", latents, stats, {"min_auc": min_auc})


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
    return DetectorSet("discovered_top_auc", "top_auc", order, stats, {"k": k})


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
        {"min_shuffled_rate": min_shuffled_rate, "eps": eps},
    )


def matched_random_sets(
    detectors: list[int],
    frequency: np.ndarray,
    mean_activation: np.ndarray,
    n_sets: int,
    seed: int,
    candidates_per_latent: int = 5,
) -> list[list[int]]:
    """``n_sets`` random latent sets, each matched one-to-one to ``detectors`` on (log frequency, log mean
    activation): for every detector, one latent drawn at random among its ``candidates_per_latent`` nearest live
    non-detector latents not used yet in that set. Dead latents (frequency 0) are never drawn."""
    frequency = np.asarray(frequency, dtype=float)
    mean_activation = np.asarray(mean_activation, dtype=float)
    det = set(int(d) for d in detectors)
    pool = np.array([j for j in np.flatnonzero(frequency > 0) if int(j) not in det])
    if len(pool) < len(det):
        raise ValueError(f"only {len(pool)} live non-detector latents to match {len(det)} detectors")
    feats = np.stack([np.log10(frequency + 1e-9), np.log10(mean_activation + 1e-9)], axis=1)
    scale = feats[pool].std(axis=0) + 1e-9
    rng = np.random.default_rng(seed)
    sets: list[list[int]] = []
    for _ in range(n_sets):
        used: set[int] = set()
        chosen: list[int] = []
        for d in sorted(det):
            dist = (((feats[pool] - feats[d]) / scale) ** 2).sum(axis=1)
            order = [int(pool[i]) for i in np.argsort(dist, kind="stable") if int(pool[i]) not in used]
            pick = int(rng.choice(order[:candidates_per_latent]))
            used.add(pick)
            chosen.append(pick)
        sets.append(sorted(chosen))
    return sets


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

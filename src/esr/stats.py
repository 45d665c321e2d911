"""Hypothesis tests and effect sizes the paper did not run: its code reports Wald intervals and simple ratios of
rounded percentages, with no significance test for any headline comparison, although the ablation runs are paired
with the baseline by seed and the 5 trials of a latent are not independent.

* Paired comparisons (ablation / random-ablation replays share latent, prompt and seed with the baseline):
  McNemar's exact test on the discordant pairs (trials treated as independent, as a reference), beside it a
  latent-clustered sign-flip permutation test on the per-latent sums of paired differences (the 5 trials of a latent
  are not independent), and paired differences with a bootstrap over latents (NaN with a reason below 2 latents).
* Unpaired contrasts (e.g. meta-prompt variants with fresh seeds, models): Fisher's exact test, Newcombe CI.
* Relative changes (the paper's "−25 %", "4.3×") from unrounded counts, with a Katz log-ratio CI.
* Model-size trend: logistic regression of ESR on log(parameter count), cluster-robust SEs by (model, latent).
* Multiple comparisons: Holm over the family of comparisons reported together, once over the trial-level p-values and
  once over the clustered ones.
* Cross-judge agreement: multi-attempt agreement, Cohen's kappa, ESR-direction agreement, Pearson/Spearman.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st

from esr.metrics import BootstrapSpec, Interval, Proportion, cluster_bootstrap_ratios, cluster_codes, nan_to_none, z_for

#: Keys that identify the same trial across a baseline run and its replay (ablation, random ablation).
PAIR_KEYS = ("model", "latent", "prompt_id", "seed")


# ----------------------------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test. ``b`` = pairs positive under the baseline only, ``c`` = under the other condition only.

    The p-value is the two-sided exact binomial test of b ~ Binomial(b + c, 1/2)."""

    b: int
    c: int
    n_both: int
    n_neither: int
    pvalue: float

    @property
    def n_pairs(self) -> int:
        return self.b + self.c + self.n_both + self.n_neither

    @property
    def n_discordant(self) -> int:
        return self.b + self.c

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_pairs": self.n_pairs, "test": "McNemar exact (binomial on discordant pairs)"}


def mcnemar_exact(b: int, c: int, n_both: int = 0, n_neither: int = 0) -> McNemarResult:
    """Exact McNemar test from the discordant counts (b: baseline-only positives, c: other-only positives)."""
    n = b + c
    p = 1.0 if n == 0 else float(_st.binomtest(int(b), int(n), 0.5, alternative="two-sided").pvalue)
    return McNemarResult(int(b), int(c), int(n_both), int(n_neither), min(1.0, p))


def mcnemar_from_pairs(base: Sequence[bool], other: Sequence[bool]) -> McNemarResult:
    """McNemar's exact test on two aligned boolean outcome vectors (one entry per pair)."""
    a = np.asarray(base, dtype=bool)
    o = np.asarray(other, dtype=bool)
    if a.shape != o.shape:
        raise ValueError("paired outcome vectors must have the same length")
    return mcnemar_exact(int((a & ~o).sum()), int((~a & o).sum()), int((a & o).sum()), int((~a & ~o).sum()))


# ----------------------------------------------------------------------------------------------- clustered test

#: Default resamples of the cluster sign-flip test (exact enumeration when 2^clusters is not larger).
SIGN_FLIP_RESAMPLES = 9999


@dataclass(frozen=True)
class ClusterSignFlipResult:
    """Latent-clustered paired permutation test: H0 = within every cluster the two conditions are exchangeable, so
    the sign of each cluster's summed paired difference is ±1 with probability 1/2 independently of the others.

    ``statistic`` is the mean paired difference (other − base) over pairs; the p-value is two-sided. With C clusters
    the smallest attainable p-value is 2^(1 − C) (``min_pvalue``); ``exact`` says whether all 2^C sign patterns were
    enumerated. ``reason`` says why there is no test (no pairs)."""

    statistic: float
    n_pairs: int
    n_clusters: int
    pvalue: float
    exact: bool
    n_resamples: int
    reason: str | None = None

    @property
    def min_pvalue(self) -> float:
        return min(1.0, 2.0 ** (1 - self.n_clusters)) if self.n_clusters else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": nan_to_none(self.statistic),
            "n_pairs": self.n_pairs,
            "n_clusters": self.n_clusters,
            "pvalue": nan_to_none(self.pvalue),
            "min_pvalue": nan_to_none(self.min_pvalue),
            "exact": self.exact,
            "n_resamples": self.n_resamples,
            "reason": self.reason,
            "test": "cluster sign-flip permutation test on per-latent sums of paired differences (two-sided)",
        }


def cluster_sign_flip_test(
    diff: Sequence[float], codes: Sequence[int], *, n_resamples: int = SIGN_FLIP_RESAMPLES, seed: int = 0
) -> ClusterSignFlipResult:
    """Two-sided sign-flip permutation test of "mean paired difference = 0" with clusters (latents) as the unit.

    ``diff``: (n_pairs,) paired differences (other − base, e.g. ESR indicators: −1, 0, 1); ``codes``: (n_pairs,)
    cluster id of each pair. The per-cluster sums are the exchangeable units; the test statistic is their sum.
    Computed by ``scipy.stats.permutation_test`` (one sample, ``permutation_type="samples"`` flips signs), exact when
    2^C <= ``n_resamples``, else ``n_resamples`` seeded random sign patterns. Raises ValueError when the two arrays
    differ in length. Sources: Fisher's randomisation test for paired data; cluster (latent) as unit as in the
    cluster bootstrap of ``esr.metrics``."""
    d = np.asarray(diff, dtype=float)
    c = np.asarray(codes)
    if d.shape != c.shape:
        raise ValueError(f"diff and codes must have the same length (got {d.shape} and {c.shape})")
    n = int(d.size)
    if n == 0:
        return ClusterSignFlipResult(math.nan, 0, 0, math.nan, True, 0, "no pairs")
    _, inv = np.unique(c, return_inverse=True)
    sums = np.bincount(inv, weights=d)
    n_clusters = int(sums.size)
    mean = float(d.mean())
    if not np.any(sums != 0) or n_clusters == 1:  # one cluster: both sign patterns give the same |T|
        return ClusterSignFlipResult(mean, n, n_clusters, 1.0, True, 0 if n_clusters > 1 else 2)
    exact = 2.0**n_clusters <= n_resamples
    res = _st.permutation_test(
        (sums,),
        lambda x, axis: np.sum(x, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return ClusterSignFlipResult(
        mean, n, n_clusters, min(1.0, float(res.pvalue)), exact, int(res.null_distribution.size)
    )


# ----------------------------------------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference (other − baseline) with a percentile bootstrap CI over latents (pairs resampled by
    latent cluster)."""

    n_pairs: int
    n_clusters: int
    mean: float
    ci: Interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_pairs": self.n_pairs,
            "n_clusters": self.n_clusters,
            "mean": nan_to_none(self.mean),
            "ci": self.ci.as_list(),
            "ci_method": self.ci.method,
            "ci_note": self.ci.reason,
        }


@dataclass(frozen=True)
class PairedComparison:
    """Baseline vs one other condition on the trials present (and included) in both, matched by ``keys``."""

    label: str
    keys: tuple[str, ...]
    n_pairs: int
    n_base_only: int
    n_other_only: int
    base_multi: Proportion
    other_multi: Proportion
    base_esr: Proportion
    other_esr: Proportion
    multi_test: McNemarResult
    esr_test: McNemarResult
    multi_diff: PairedDifference
    esr_diff: PairedDifference
    first_score_diff: PairedDifference
    delta_diff: PairedDifference
    multi_cluster_test: ClusterSignFlipResult
    esr_cluster_test: ClusterSignFlipResult

    def pvalues(self) -> dict[str, float]:
        """McNemar p-values (trials as independent pairs)."""
        return {f"{self.label}:multi_rate": self.multi_test.pvalue, f"{self.label}:esr_rate": self.esr_test.pvalue}

    def clustered_pvalues(self) -> dict[str, float]:
        """Latent-clustered sign-flip p-values (NaN-free: comparisons without pairs have none)."""
        out = {
            f"{self.label}:multi_rate": self.multi_cluster_test.pvalue,
            f"{self.label}:esr_rate": self.esr_cluster_test.pvalue,
        }
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "keys": list(self.keys),
            "n_pairs": self.n_pairs,
            "n_base_only": self.n_base_only,
            "n_other_only": self.n_other_only,
            "paired_rates": {
                "base_multi": self.base_multi.to_dict(),
                "other_multi": self.other_multi.to_dict(),
                "base_esr": self.base_esr.to_dict(),
                "other_esr": self.other_esr.to_dict(),
            },
            "mcnemar": {"multi_rate": self.multi_test.to_dict(), "esr_rate": self.esr_test.to_dict()},
            "cluster_sign_flip": {
                "multi_rate": self.multi_cluster_test.to_dict(),
                "esr_rate": self.esr_cluster_test.to_dict(),
            },
            "paired_differences": {
                "multi_rate": self.multi_diff.to_dict(),
                "esr_rate": self.esr_diff.to_dict(),
                "first_score": self.first_score_diff.to_dict(),
                "last_minus_first": self.delta_diff.to_dict(),
            },
        }


def pair_trials(
    base: pd.DataFrame, other: pd.DataFrame, keys: Sequence[str] = PAIR_KEYS
) -> tuple[pd.DataFrame, int, int]:
    """Inner-join two *included* trial tables on ``keys`` (columns suffixed ``_base``/``_other``).

    Returns (pairs, #baseline rows without partner, #other rows without partner). Duplicate keys are an error:
    a replay must map one-to-one onto its baseline."""
    keys = [k for k in keys if k in base.columns and k in other.columns]
    if not keys:
        raise ValueError("no pairing key present in both tables")
    for name, df in (("baseline", base), ("other", other)):
        if df.duplicated(keys).any():
            raise ValueError(f"{name} table has duplicate pairing keys {keys}")
    cols = ["multi", "esr", "first_score", "last_score", "delta"]
    merged = base[keys + cols].merge(other[keys + cols], on=keys, how="inner", suffixes=("_base", "_other"))
    return merged, len(base) - len(merged), len(other) - len(merged)


def _paired_diff(diff: np.ndarray, codes: np.ndarray, spec: BootstrapSpec) -> PairedDifference:
    n = int(diff.size)
    mean = float(diff.mean()) if n else math.nan
    ci = cluster_bootstrap_ratios(codes, {"d": (diff, np.ones(n))}, spec)["d"]
    return PairedDifference(
        n, int(np.unique(codes).size), mean, Interval(ci.lo, ci.hi, "paired_cluster_bootstrap", ci.level, ci.reason)
    )


def paired_comparison(
    base: pd.DataFrame,
    other: pd.DataFrame,
    label: str = "other",
    keys: Sequence[str] = PAIR_KEYS,
    bootstrap: BootstrapSpec = BootstrapSpec(),
) -> PairedComparison:
    """Compare two *included* trial tables (see ``metrics.include_trials``) pair by pair.

    Tests: McNemar exact on multi-attempt and on ESR indicators (pairs as independent), and beside it the
    latent-clustered sign-flip test (``cluster_sign_flip_test``, seeded by ``bootstrap.seed``). Effect sizes: paired
    differences (other − base) of the multi and ESR indicators (i.e. rate differences on the paired subset), of the
    first score and of last − first, each with a percentile bootstrap that resamples latents (clusters of pairs;
    NaN with a reason below 2 latents)."""
    pairs, n_b, n_o = pair_trials(base, other, keys)
    codes = cluster_codes(pairs) if "latent" in pairs.columns else np.arange(len(pairs))
    bm, om = pairs["multi_base"].to_numpy(bool), pairs["multi_other"].to_numpy(bool)
    be, oe = pairs["esr_base"].to_numpy(bool), pairs["esr_other"].to_numpy(bool)
    n = len(pairs)
    return PairedComparison(
        label=label,
        keys=tuple(k for k in keys if k in pairs.columns),
        n_pairs=n,
        n_base_only=n_b,
        n_other_only=n_o,
        base_multi=Proportion(int(bm.sum()), n),
        other_multi=Proportion(int(om.sum()), n),
        base_esr=Proportion(int(be.sum()), n),
        other_esr=Proportion(int(oe.sum()), n),
        multi_test=mcnemar_from_pairs(bm, om),
        esr_test=mcnemar_from_pairs(be, oe),
        multi_diff=_paired_diff(om.astype(float) - bm, codes, bootstrap),
        esr_diff=_paired_diff(oe.astype(float) - be, codes, bootstrap),
        first_score_diff=_paired_diff(
            pairs["first_score_other"].to_numpy(float) - pairs["first_score_base"].to_numpy(float), codes, bootstrap
        ),
        delta_diff=_paired_diff(
            pairs["delta_other"].to_numpy(float) - pairs["delta_base"].to_numpy(float), codes, bootstrap
        ),
        multi_cluster_test=cluster_sign_flip_test(om.astype(float) - bm, codes, seed=bootstrap.seed),
        esr_cluster_test=cluster_sign_flip_test(oe.astype(float) - be, codes, seed=bootstrap.seed),
    )


# ----------------------------------------------------------------------------------------------- unpaired


@dataclass(frozen=True)
class FisherResult:
    """Fisher's exact test of k1/n1 vs k2/n2 (two-sided), with the rate difference p2 − p1 and its Newcombe CI."""

    k1: int
    n1: int
    k2: int
    n2: int
    odds_ratio: float
    pvalue: float
    difference: float
    difference_ci: Interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "k1": self.k1,
            "n1": self.n1,
            "k2": self.k2,
            "n2": self.n2,
            "odds_ratio": nan_to_none(self.odds_ratio),
            "pvalue": self.pvalue,
            "difference": nan_to_none(self.difference),
            "difference_ci": self.difference_ci.as_list(),
            "test": "Fisher exact, two-sided; difference CI Newcombe hybrid score",
        }


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> Interval:
    """Newcombe's hybrid-score CI for p2 − p1 (from the two Wilson intervals)."""
    from esr.metrics import wilson_interval

    if n1 == 0 or n2 == 0:
        return Interval(math.nan, math.nan, "newcombe", level)
    p1, p2 = k1 / n1, k2 / n2
    w1, w2 = wilson_interval(k1, n1, level), wilson_interval(k2, n2, level)
    d = p2 - p1
    lo = d - math.sqrt((p2 - w2.lo) ** 2 + (w1.hi - p1) ** 2)
    hi = d + math.sqrt((w2.hi - p2) ** 2 + (p1 - w1.lo) ** 2)
    return Interval(lo, hi, "newcombe", level)


def fisher_test(k1: int, n1: int, k2: int, n2: int) -> FisherResult:
    """Fisher's exact test on [[k1, n1−k1], [k2, n2−k2]]."""
    res = _st.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]])
    diff = (k2 / n2 - k1 / n1) if n1 and n2 else math.nan
    return FisherResult(
        int(k1),
        int(n1),
        int(k2),
        int(n2),
        float(res.statistic),
        float(res.pvalue),
        diff,
        newcombe_difference(k1, n1, k2, n2),
    )


@dataclass(frozen=True)
class RelativeChange:
    """Ratio p_other / p_base and relative change (ratio − 1), from counts, with a Katz log-ratio CI.

    The Katz interval treats the two samples as independent; for paired replays it is conservative."""

    k_base: int
    n_base: int
    k_other: int
    n_other: int
    ratio: float
    ratio_ci: Interval

    @property
    def relative_change(self) -> float:
        return self.ratio - 1.0

    @property
    def relative_change_ci(self) -> Interval:
        return Interval(self.ratio_ci.lo - 1.0, self.ratio_ci.hi - 1.0, "katz_log_ratio")

    def to_dict(self) -> dict[str, Any]:
        return {
            "k_base": self.k_base,
            "n_base": self.n_base,
            "k_other": self.k_other,
            "n_other": self.n_other,
            "ratio": nan_to_none(self.ratio),
            "ratio_ci": self.ratio_ci.as_list(),
            "relative_change": nan_to_none(self.relative_change),
            "relative_change_ci": self.relative_change_ci.as_list(),
        }


def relative_change(k_base: int, n_base: int, k_other: int, n_other: int, level: float = 0.95) -> RelativeChange:
    """(k_other/n_other) / (k_base/n_base) from unrounded counts, with the Katz CI
    exp(log RR ± z·√(1/k2 − 1/n2 + 1/k1 − 1/n1)).

    With a zero count the CI is undefined (NaN); the point ratio is 0 or inf as appropriate."""
    if n_base == 0 or n_other == 0:
        return RelativeChange(k_base, n_base, k_other, n_other, math.nan, Interval(math.nan, math.nan, "katz"))
    pb, po = k_base / n_base, k_other / n_other
    ratio = po / pb if pb > 0 else (math.inf if po > 0 else math.nan)
    if k_base == 0 or k_other == 0:
        ci = Interval(math.nan, math.nan, "katz", level)
    else:
        se = math.sqrt(1 / k_other - 1 / n_other + 1 / k_base - 1 / n_base)
        z = z_for(level)
        ci = Interval(ratio * math.exp(-z * se), ratio * math.exp(z * se), "katz", level)
    return RelativeChange(int(k_base), int(n_base), int(k_other), int(n_other), ratio, ci)


# ----------------------------------------------------------------------------------------------- Holm


@dataclass(frozen=True)
class AdjustedP:
    pvalue: float
    p_holm: float
    reject: bool


def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> dict[str, AdjustedP]:
    """Holm step-down adjustment over one family of comparisons (the comparisons reported together)."""
    from statsmodels.stats.multitest import multipletests

    names = list(pvalues)
    if not names:
        return {}
    reject, p_adj, _, _ = multipletests([pvalues[k] for k in names], alpha=alpha, method="holm")
    return {k: AdjustedP(float(pvalues[k]), float(p), bool(r)) for k, p, r in zip(names, p_adj, reject)}


# ----------------------------------------------------------------------------------------------- size trend


@dataclass(frozen=True)
class TrendResult:
    """Logistic regression of an indicator on log(parameter count); SEs cluster-robust by (model, latent).

    ``slope`` is the change in log-odds per unit of natural-log parameter count; ``odds_ratio_per_10x`` =
    exp(slope·ln 10). With few models this is descriptive, not a test of a dose–response law."""

    outcome: str
    n_trials: int
    n_clusters: int
    n_models: int
    intercept: float
    slope: float
    se: float
    z: float
    pvalue: float
    ci: Interval
    error: str | None = None

    @property
    def odds_ratio_per_10x(self) -> float:
        return math.exp(self.slope * math.log(10.0)) if not math.isnan(self.slope) else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = {k: (nan_to_none(v) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "ci"}
        d["ci"] = self.ci.as_list()
        d["odds_ratio_per_10x"] = nan_to_none(self.odds_ratio_per_10x)
        d["method"] = "GLM Binomial (logit) ~ log(n_params), cov_type='cluster' by (model, latent)"
        return d


def size_trend(trials: pd.DataFrame, n_params: Mapping[str, float], outcome: str = "esr") -> TrendResult:
    """Fit ``outcome ~ 1 + log(n_params[model])`` on *included* trials of several models."""
    import statsmodels.api as sm

    df = trials[trials["model"].isin(list(n_params))]
    nan_ci = Interval(math.nan, math.nan, "wald_cluster")
    n_models = int(df["model"].nunique())
    codes = cluster_codes(df)
    n_clusters = int(np.unique(codes).size)

    def failed(msg: str) -> TrendResult:
        return TrendResult(
            outcome, len(df), n_clusters, n_models, math.nan, math.nan, math.nan, math.nan, math.nan, nan_ci, msg
        )

    y = df[outcome].to_numpy(float)
    if n_models < 2:
        return failed("need at least two models")
    if y.size == 0 or y.min() == y.max():
        return failed("outcome has no variation")
    x = np.log(df["model"].map(n_params).to_numpy(float))
    X = sm.add_constant(x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.GLM(y, X, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": codes})
    except Exception as exc:  # perfect separation, singular matrix
        return failed(f"{type(exc).__name__}: {exc}")
    lo, hi = fit.conf_int()[1]
    return TrendResult(
        outcome,
        len(df),
        n_clusters,
        n_models,
        float(fit.params[0]),
        float(fit.params[1]),
        float(fit.bse[1]),
        float(fit.tvalues[1]),
        float(fit.pvalues[1]),
        Interval(float(lo), float(hi), "wald_cluster"),
    )


# ----------------------------------------------------------------------------------------------- cross-judge


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters' labels: (p_o − p_e) / (1 − p_e); 1.0 when both raters are constant and equal."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("kappa needs two non-empty label vectors of equal length")
    cats = np.unique(np.concatenate([a, b]))
    po = float((a == b).mean())
    pe = float(sum((a == c).mean() * (b == c).mean() for c in cats))
    if pe == 1.0:
        return 1.0 if po == 1.0 else math.nan
    return (po - pe) / (1.0 - pe)


@dataclass(frozen=True)
class JudgeAgreement:
    """Agreement between two judges on the trials both judged (and both included)."""

    judge_a: str
    judge_b: str
    n_common: int
    multi_agreement: Proportion
    multi_kappa: float
    esr_direction_agreement: Proportion
    pearson_first: float
    pearson_p: float
    spearman_first: float
    spearman_p: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge_a": self.judge_a,
            "judge_b": self.judge_b,
            "n_common": self.n_common,
            "multi_agreement": self.multi_agreement.to_dict(),
            "multi_kappa": nan_to_none(self.multi_kappa),
            "esr_direction_agreement": self.esr_direction_agreement.to_dict(),
            "pearson_first": nan_to_none(self.pearson_first),
            "pearson_p": nan_to_none(self.pearson_p),
            "spearman_first": nan_to_none(self.spearman_first),
            "spearman_p": nan_to_none(self.spearman_p),
        }


def judge_agreement(
    a: pd.DataFrame, b: pd.DataFrame, judge_a: str = "a", judge_b: str = "b", keys: Sequence[str] = ("trial_id",)
) -> JudgeAgreement:
    """Compare two judges' *included* trial tables matched on ``keys``.

    multi agreement: fraction of common trials where both agree on n ≥ 2 (plus Cohen's kappa of that flag);
    ESR-direction agreement: among trials both call multi-attempt, fraction agreeing on (last − first > 0);
    Pearson and Spearman correlations of the first-attempt scores."""
    keys = list(keys)
    m = a[keys + ["multi", "delta", "first_score"]].merge(
        b[keys + ["multi", "delta", "first_score"]], on=keys, suffixes=("_a", "_b")
    )
    n = len(m)
    ma, mb = m["multi_a"].to_numpy(bool), m["multi_b"].to_numpy(bool)
    both = ma & mb
    da, db = m["delta_a"].to_numpy(float)[both] > 0, m["delta_b"].to_numpy(float)[both] > 0
    fa, fb = m["first_score_a"].to_numpy(float), m["first_score_b"].to_numpy(float)
    corr_ok = n >= 3 and np.ptp(fa) > 0 and np.ptp(fb) > 0
    pr = _st.pearsonr(fa, fb) if corr_ok else None
    sr = _st.spearmanr(fa, fb) if corr_ok else None
    return JudgeAgreement(
        judge_a,
        judge_b,
        n,
        Proportion(int((ma == mb).sum()), n),
        cohen_kappa(ma, mb) if n else math.nan,
        Proportion(int((da == db).sum()), int(both.sum())),
        float(pr.statistic) if pr else math.nan,
        float(pr.pvalue) if pr else math.nan,
        float(sr.statistic) if sr else math.nan,
        float(sr.pvalue) if sr else math.nan,
    )


def pairwise_judge_agreement(
    included: pd.DataFrame, judge_col: str = "judge_id", keys: Sequence[str] = ("trial_id",)
) -> list[JudgeAgreement]:
    """``judge_agreement`` for every unordered pair of judges in one included-trials table."""
    judges = sorted(str(j) for j in included[judge_col].dropna().unique())
    out = []
    for i, ja in enumerate(judges):
        for jb in judges[i + 1 :]:
            out.append(
                judge_agreement(included[included[judge_col] == ja], included[included[judge_col] == jb], ja, jb, keys)
            )
    return out


# ----------------------------------------------------------------------------------------------- families


@dataclass
class ComparisonFamily:
    """A family of comparisons reported together, with Holm-adjusted p-values over all of them."""

    name: str
    paired: list[PairedComparison] = field(default_factory=list)
    unpaired: dict[str, dict[str, FisherResult]] = field(default_factory=dict)
    relative: dict[str, dict[str, RelativeChange]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    alpha: float = 0.05

    def pvalues(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pc in self.paired:
            out.update({f"paired:{k}": v for k, v in pc.pvalues().items()})
        for label, tests in self.unpaired.items():
            out.update({f"unpaired:{label}:{m}": t.pvalue for m, t in tests.items()})
        return out

    def clustered_pvalues(self) -> dict[str, float]:
        """The latent-clustered p-values of the paired comparisons (the family Holm is applied to a second time)."""
        out: dict[str, float] = {}
        for pc in self.paired:
            out.update({f"paired_clustered:{k}": v for k, v in pc.clustered_pvalues().items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        adj = holm(self.pvalues(), self.alpha)
        adj_c = holm(self.clustered_pvalues(), self.alpha)
        return {
            "family": self.name,
            "multiple_comparisons": f"Holm over the {len(adj)} p-values of this family (alpha {self.alpha})",
            "multiple_comparisons_clustered": (
                f"Holm over the {len(adj_c)} latent-clustered sign-flip p-values of this family (alpha {self.alpha})"
            ),
            "paired": [pc.to_dict() for pc in self.paired],
            "unpaired": {lab: {m: t.to_dict() for m, t in tests.items()} for lab, tests in self.unpaired.items()},
            "relative_change": {lab: {m: r.to_dict() for m, r in rr.items()} for lab, rr in self.relative.items()},
            "holm": {k: asdict(v) for k, v in adj.items()},
            "holm_clustered": {k: asdict(v) for k, v in adj_c.items()},
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------------------------- across models


def cross_model_comparison(
    trials: pd.DataFrame,
    n_params: Mapping[str, float],
    *,
    outcomes: Sequence[tuple[str, str]] = (("esr_rate", "esr"), ("multi_rate", "multi")),
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Does resistance grow with model size (paper Sec. 3.1, Fig. 2: "larger models resist more")? On the *included*
    exp1 trials of every model (``metrics.include_trials``; columns ``model``, ``latent``, ``esr``, ``multi``):

    * ``trend``: per outcome, the logistic regression of the indicator on ln(parameter count) with SEs clustered
      by (model, latent) (:func:`size_trend`, statsmodels GLM);
    * ``pairwise``: every pair of models (smaller first), per outcome, the same clustered regression on the pair
      alone (a two-group test: its slope is the log odds ratio per ln-unit of size) and Fisher's exact test
      (trials treated as independent), with Holm over all pairs and outcomes on the clustered p-values;
    * ``rates``: each model's k, n, estimate and Wilson interval.

    ``n_params``: model name -> parameter count (``models.<m>.n_params``). With fewer than two models that have both
    trials and a parameter count, returns ``status: not_run`` and the reason (no test is possible)."""
    models = sorted(
        (m for m in trials["model"].unique() if m in n_params) if len(trials) else [], key=lambda m: n_params[m]
    )
    out: dict[str, Any] = {
        "models": [{"model": m, "n_params": float(n_params[m])} for m in models],
        "outcomes": [name for name, _ in outcomes],
        "method": "GLM Binomial (logit) ~ ln(n_params), cov_type='cluster' by (model, latent); pairwise: the same "
        "on each pair, Holm over pairs x outcomes; Fisher exact alongside",
    }
    if len(models) < 2:
        missing = sorted(set(n_params) - set(models))
        return {
            **out,
            "status": "not_run",
            "reason": f"needs >= 2 models with exp1 trials; have {len(models)} ({', '.join(models) or 'none'})"
            + (f"; no trials for {', '.join(missing)}" if missing else ""),
        }
    df = trials[trials["model"].isin(models)]
    rates = {
        m: {name: Proportion(int(g[col].sum()), len(g)).to_dict() for name, col in outcomes}
        for m, g in df.groupby("model", sort=False)
    }
    trend = {name: size_trend(df, n_params, col).to_dict() for name, col in outcomes}
    pairwise: list[dict[str, Any]] = []
    pvals: dict[str, float] = {}
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            pair = df[df["model"].isin([a, b])]
            ga, gb = pair[pair["model"] == a], pair[pair["model"] == b]
            entry: dict[str, Any] = {"smaller": a, "larger": b, "tests": {}}
            for name, col in outcomes:
                fit = size_trend(pair, n_params, col)
                fisher = fisher_test(int(ga[col].sum()), len(ga), int(gb[col].sum()), len(gb))
                entry["tests"][name] = {
                    "clustered_logit": fit.to_dict(),
                    "fisher": fisher.to_dict(),
                    "difference_larger_minus_smaller": nan_to_none(fisher.difference),
                }
                if not math.isnan(fit.pvalue):
                    pvals[f"{b} vs {a}:{name}"] = fit.pvalue
            pairwise.append(entry)
    adj = holm(pvals, alpha)
    for entry in pairwise:
        for name in entry["tests"]:
            key = f"{entry['larger']} vs {entry['smaller']}:{name}"
            entry["tests"][name]["holm"] = asdict(adj[key]) if key in adj else None
    return {
        **out,
        "status": "ok",
        "rates": rates,
        "trend": trend,
        "pairwise": pairwise,
        "multiple_comparisons": f"Holm over the {len(adj)} pairwise clustered p-values (alpha {alpha})",
    }


# ----------------------------------------------------------------------------------------------- specificity


def specificity_comparison(
    detector: pd.DataFrame,
    controls: Mapping[str, pd.DataFrame],
    *,
    label: str,
    keys: Sequence[str] = PAIR_KEYS,
    bootstrap: BootstrapSpec = BootstrapSpec(),
) -> dict[str, Any]:
    """The specificity contrast of paper Sec. 3.4 / App. A.3.3: ablating the off-topic detectors (exp3) vs ablating
    matched random latents (exp10), paired on the trial ``keys`` (latent, prompt, seed: both replay exp1).

    ``detector``: included trials of one exp3 cell; ``controls``: control-set name -> included trials of an exp10
    cell matched to that set. Per control set, :func:`paired_comparison` with the control as the base (differences
    are detector − control; McNemar exact and the latent-clustered sign-flip test on multi and ESR, latent-cluster
    bootstrap CIs; ``pvalues`` are the clustered ones, ``mcnemar_pvalues`` the others). ``pooled``: per trial key present in the detector run and
    *every* control run, detector indicator − mean control indicator, with a latent-cluster bootstrap CI and
    :func:`cluster_sign_flip_test` (seeded by ``bootstrap.seed``)."""
    paired = [
        paired_comparison(ctrl, detector, f"{label} vs {name}", keys, bootstrap) for name, ctrl in controls.items()
    ]
    pooled: dict[str, Any] = {"n_controls": len(controls)}
    if controls and len(detector):
        k = [c for c in keys if c in detector.columns]
        merged = detector[k + ["multi", "esr"]].astype({"multi": float, "esr": float})
        for i, ctrl in enumerate(controls.values()):
            part = ctrl[k + ["multi", "esr"]].astype({"multi": float, "esr": float})
            merged = merged.merge(part.rename(columns={"multi": f"multi_{i}", "esr": f"esr_{i}"}), on=k, how="inner")
        codes = cluster_codes(merged) if "latent" in merged.columns else np.arange(len(merged))
        pooled["n_pairs"] = int(len(merged))
        for name, col in (("multi_rate", "multi"), ("esr_rate", "esr")):
            ctrl_mean = merged[[f"{col}_{i}" for i in range(len(controls))]].mean(axis=1).to_numpy(float)
            diff = merged[col].to_numpy(float) - ctrl_mean
            pooled[name] = {
                "detector": nan_to_none(float(merged[col].mean())) if len(merged) else None,
                "controls_mean": nan_to_none(float(ctrl_mean.mean())) if len(merged) else None,
                "difference": _paired_diff(diff, codes, bootstrap).to_dict(),
                "cluster_sign_flip": cluster_sign_flip_test(diff, codes, seed=bootstrap.seed).to_dict(),
            }
    return {
        "detector_set": label,
        "controls": list(controls),
        "keys": list(keys),
        "paired": [p.to_dict() for p in paired],
        "pvalues": {k: v for p in paired for k, v in p.clustered_pvalues().items()},
        "mcnemar_pvalues": {k: v for p in paired for k, v in p.pvalues().items()},
        "pooled": pooled,
        "note": "differences are detector ablation minus random ablation; p-values for Holm: the latent-clustered "
        "sign-flip tests (McNemar exact, which treats pairs as independent, alongside)",
    }

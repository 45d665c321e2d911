"""Per-trial metrics and their intervals, exactly as the authors' code computes the paper's numbers, plus the
intervals the paper lacks (Wilson, latent-clustered bootstrap).

Pipeline: ``include_trials`` applies the authors' inclusion rules in order (``EXCLUSION_REASONS``: the latent
failed, the trial failed, no attempts, no scored attempts, and, only if asked, a degraded output) and counts every
exclusion by reason; ``summarise`` turns the included trials into counts (k, n) and means, from which every rate and
interval is derived. Nothing is ever computed from a rounded percentage.

Definitions (N = number of included trials; "scores" = the non-None attempt scores of a trial):

* multi-attempt: ``len(scores) >= 2``; multi-attempt rate = #multi / N.
* ESR: multi-attempt **and** ``scores[-1] > scores[0]`` (strictly; ties are not ESR; middle attempts ignored);
  ESR rate = #ESR / N.
* improvement rate = #ESR / #multi.
* first-attempt score: ``scores[0]``, averaged over all N.
* mean score improvement (MSI), two definitions, both reported and labelled:
  ``msi_multi`` (authors' HEAD): mean(last - first) over multi-attempt trials only;
  ``msi_all`` (authors' first README): mean over all N trials, single-attempt trials contributing 0.

Intervals: Wilson for rates; for means of bounded scores (first score in [0, 100], MSI in [-100, 100];
``METRIC_BOUNDS``) an interval that stays inside the bounds (``MeanEstimate.bounded``: logit-transformed
delta-method interval), with the paper's unbounded mean ± 1.96·SE kept beside it as ``wald_paper``; a
latent-clustered percentile bootstrap, NaN with a reason when there are fewer than ``MIN_CLUSTERS`` clusters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st

#: z for the paper's normal-approximation bars (the authors hard-code 1.96).
Z95 = 1.96
#: ≥ this many consecutive identical words (each longer than one character) make an output "degraded".
DEGRADED_MIN_RUN = 5
#: Exclusion reasons, in the order the authors' code applies the rules.
EXCLUSION_REASONS = ("latent_error", "trial_error", "no_attempts", "no_scores", "degraded")
#: The range each mean metric can take (judge scores are 0-100, paper Sec. 2.3); their intervals stay inside it.
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "first_score": (0.0, 100.0),
    "msi_multi": (-100.0, 100.0),
    "msi_all": (-100.0, 100.0),
}
#: A cluster bootstrap needs at least this many clusters (latents); with one cluster every resample is the same
#: cluster and the percentile interval has zero width, which is not an interval.
MIN_CLUSTERS = 2


# ----------------------------------------------------------------------------------------------- small helpers


def _is_missing(x: Any) -> bool:
    """True for None, NaN and pandas NA scalars (not for containers)."""
    if x is None or x is pd.NA:
        return True
    return isinstance(x, float) and math.isnan(x)


def is_set(x: Any) -> bool:
    """Whether a table cell holds a value: Python truthiness (the authors' ``if trial.error:``), with None, NaN and
    NA as unset."""
    if _is_missing(x):
        return False
    if isinstance(x, (str, bytes)):
        return len(x) > 0
    return bool(x)


def attempt_count(x: Any) -> int:
    """Number of attempts (scored or not) in an ``attempt_scores`` cell; 0 when missing."""
    return 0 if _is_missing(x) else len(list(x))


def is_degraded(text: Any, min_run: int = DEGRADED_MIN_RUN) -> bool:
    """Whether ``text`` has ≥ ``min_run`` consecutive identical whitespace-split words of length > 1."""
    if not isinstance(text, str):
        return False
    run, prev = 0, None
    for word in text.split():
        if len(word) > 1 and word == prev:
            run += 1
        else:
            run = 1 if len(word) > 1 else 0
        prev = word
        if run >= min_run:
            return True
    return False


def nan_to_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


# ----------------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A two-sided interval with the name of the method that produced it; ``reason`` says why it is NaN (or
    otherwise qualified) where it is."""

    lo: float
    hi: float
    method: str
    level: float = 0.95
    reason: str | None = None

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def as_list(self) -> list[float | None]:
        return [nan_to_none(self.lo), nan_to_none(self.hi)]

    def scaled(self, factor: float) -> Interval:
        return Interval(self.lo * factor, self.hi * factor, self.method, self.level, self.reason)

    @property
    def is_nan(self) -> bool:
        return math.isnan(self.lo) or math.isnan(self.hi)


def z_for(level: float) -> float:
    """Two-sided standard-normal quantile for a confidence level (0.95 → 1.95996...)."""
    return float(_st.norm.ppf(0.5 + level / 2.0))


def wald_interval(k: int, n: int, z: float = Z95, clip: bool = False) -> Interval:
    """Normal-approximation interval p ± z·√(p(1−p)/n), as the paper's error bars (z = 1.96, unclipped)."""
    if n <= 0:
        return Interval(math.nan, math.nan, "wald")
    p = k / n
    half = z * math.sqrt(p * (1.0 - p) / n)
    lo, hi = p - half, p + half
    if clip:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return Interval(lo, hi, "wald")


def wilson_fraction_interval(p: float, n: float, level: float = 0.95) -> Interval:
    """Wilson score interval of an observed fraction ``p`` in [0, 1] out of ``n`` (n may be non-integer, e.g. an
    expected count's sample size); NaN for n <= 0. Source: Wilson (1927), closed form."""
    if n <= 0:
        return Interval(math.nan, math.nan, "wilson", level)
    z = z_for(level)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(0.0, p * (1.0 - p)) / n + z * z / (4 * n * n))
    lo = 0.0 if p <= 0 else max(0.0, centre - half)
    hi = 1.0 if p >= 1 else min(1.0, centre + half)
    return Interval(lo, hi, "wilson", level)


def wilson_interval(k: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval (closed form) of k out of n, our default for rates; well-behaved at k = 0 and k = n."""
    if n <= 0:
        return Interval(math.nan, math.nan, "wilson", level)
    return wilson_fraction_interval(k / n, n, level)


@dataclass(frozen=True)
class Proportion:
    """k successes out of n; every rate in the package is one of these, so intervals use exact counts."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not 0 <= self.k <= self.n:
            raise ValueError(f"a proportion needs 0 <= k <= n (got k={self.k}, n={self.n})")

    @property
    def estimate(self) -> float:
        return self.k / self.n if self.n > 0 else math.nan

    def wald(self, z: float = Z95) -> Interval:
        return wald_interval(self.k, self.n, z)

    def wilson(self, level: float = 0.95) -> Interval:
        return wilson_interval(self.k, self.n, level)

    def to_dict(self, bootstrap: Interval | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "k": int(self.k),
            "n": int(self.n),
            "estimate": nan_to_none(self.estimate),
            "wald": self.wald().as_list(),
            "wilson": self.wilson().as_list(),
        }
        _add_bootstrap(out, bootstrap)
        return out


def _add_bootstrap(out: dict[str, Any], bootstrap: Interval | None) -> None:
    if bootstrap is not None:
        out["bootstrap"] = bootstrap.as_list()
        if bootstrap.reason:
            out["bootstrap_note"] = bootstrap.reason


def bounded_mean_interval(mean: float, sd: float, n: int, bounds: tuple[float, float], level: float = 0.95) -> Interval:
    """A confidence interval for the mean of a variable confined to ``bounds`` = (a, b) that never leaves them.

    With 0 < (mean − a)/(b − a) < 1, n ≥ 2 and SD > 0: the delta-method interval on the logit scale,
    ``expit(logit p ± z·SE_p / (p(1 − p)))`` mapped back to [a, b] (method ``logit``). Otherwise (the mean on a
    bound, SD 0 or unknown): the Wilson score interval of p with n, i.e. with the largest variance p(1 − p) a
    variable in [0, 1] with mean p can have, so it is conservative (method ``wilson_bounded``). NaN for n = 0.
    Units: those of ``mean``. Source: the logit (log-odds) interval for bounded means, e.g. Agresti,
    *Categorical Data Analysis*, Sec. 1.4; Wilson (1927)."""
    a, b = float(bounds[0]), float(bounds[1])
    if not b > a:
        raise ValueError(f"bounds must satisfy lower < upper (got {bounds})")
    if n <= 0 or math.isnan(mean):
        return Interval(math.nan, math.nan, "logit", level, "no observations")
    width = b - a
    p = min(1.0, max(0.0, (mean - a) / width))
    if n >= 2 and not math.isnan(sd) and sd > 0 and 0.0 < p < 1.0:
        z = z_for(level)
        se_logit = sd / width / math.sqrt(n) / (p * (1.0 - p))
        centre = math.log(p / (1.0 - p))
        lo, hi = (1.0 / (1.0 + math.exp(-(centre + s * z * se_logit))) for s in (-1.0, 1.0))
        return Interval(a + width * lo, a + width * hi, "logit", level)
    w = wilson_fraction_interval(p, n, level)
    return Interval(a + width * w.lo, a + width * w.hi, "wilson_bounded", level)


@dataclass(frozen=True)
class MeanEstimate:
    """Sample mean with SD (ddof = 1) and SE = SD/√n.

    ``normal`` is the paper's bar, mean ± z·SE (unbounded: at small n it can leave the scale); ``interval`` is the
    one we report: ``bounded_mean_interval`` when ``bounds`` (the variable's range, e.g. (0, 100) for a judge
    score) is set, else the normal interval."""

    n: int
    mean: float
    sd: float
    bounds: tuple[float, float] | None = None

    @classmethod
    def of(cls, values: Iterable[float], bounds: tuple[float, float] | None = None) -> MeanEstimate:
        arr = np.asarray(list(values), dtype=float)
        n = int(arr.size)
        mean = float(arr.mean()) if n else math.nan
        sd = float(arr.std(ddof=1)) if n >= 2 else math.nan
        return cls(n, mean, sd, bounds)

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n >= 2 else math.nan

    def normal(self, z: float = Z95) -> Interval:
        """The paper's (Wald) bar mean ± z·SE, unclipped."""
        return Interval(self.mean - z * self.se, self.mean + z * self.se, "normal")

    def interval(self, level: float = 0.95) -> Interval:
        """Our interval: inside ``bounds`` when the estimate has them (``bounded_mean_interval``), else normal."""
        if self.bounds is None:
            return self.normal(z_for(level))
        return bounded_mean_interval(self.mean, self.sd, self.n, self.bounds, level)

    def to_dict(self, bootstrap: Interval | None = None) -> dict[str, Any]:
        ci = self.interval()
        out: dict[str, Any] = {
            "n": int(self.n),
            "mean": nan_to_none(self.mean),
            "sd": nan_to_none(self.sd),
            "se": nan_to_none(self.se),
            "ci": ci.as_list(),
            "ci_method": ci.method,
            "wald_paper": self.normal().as_list(),
        }
        if self.bounds is not None:
            out["bounds"] = list(self.bounds)
        _add_bootstrap(out, bootstrap)
        return out


def pooled_mean(parts: Sequence[MeanEstimate]) -> MeanEstimate:
    """Exact mean and SD (ddof = 1) of the union of several samples given only their (n, mean, sd); the bounds are
    the parts' (all parts must share them)."""
    parts = [p for p in parts if p.n > 0]
    bounds = {p.bounds for p in parts}
    if len(bounds) > 1:
        raise ValueError(f"cannot pool means with different bounds: {sorted(map(str, bounds))}")
    bound = bounds.pop() if bounds else None
    n = sum(p.n for p in parts)
    if n == 0:
        return MeanEstimate(0, math.nan, math.nan, bound)
    mean = sum(p.n * p.mean for p in parts) / n
    ss = sum((p.n - 1) * (0.0 if math.isnan(p.sd) else p.sd) ** 2 + p.n * (p.mean - mean) ** 2 for p in parts)
    sd = math.sqrt(ss / (n - 1)) if n >= 2 else math.nan
    return MeanEstimate(n, mean, sd, bound)


# ----------------------------------------------------------------------------------------------- inclusion


@dataclass(frozen=True)
class InclusionReport:
    """Counts of the inclusion rules (``EXCLUSION_REASONS``), applied in order; each trial is counted under the first
    rule that drops it.

    ``n_degraded`` counts degraded outputs among trials that passed rules 1–4; they are dropped (and counted in
    ``excluded['degraded']``) only when ``degraded_excluded`` is true. ``trial_errors_by_kind`` splits
    ``excluded['trial_error']`` by the trials' ``error_kind`` (``http``, ``timeout``, ``connection``, ``unreadable``,
    ``parse``, ``truncated``, ``other``; ``unknown`` where none is recorded)."""

    n_input: int
    excluded: dict[str, int]
    n_degraded: int
    degraded_excluded: bool
    n_included: int
    trial_errors_by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latent_error_mask(df: pd.DataFrame) -> pd.Series:
    if "latent_error" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["latent_error"].map(is_set).astype(bool)


def include_trials(df: pd.DataFrame, exclude_degraded: bool = False) -> tuple[pd.DataFrame, InclusionReport]:
    """Apply the inclusion rules (``EXCLUSION_REASONS``) in order to a graded trials table (``esr.trials``) and
    return (included trials, report).

    The score columns ``first_score``, ``last_score`` and ``n_attempts`` (scored attempts) are read from the table,
    where grading computed them (``esr.trials.score_columns``). The returned frame keeps all input columns and adds
    ``multi``, ``esr`` (bool), ``delta`` (last − first, float) and ``degraded`` (bool)."""
    keep = pd.Series(True, index=df.index)
    excluded: dict[str, int] = {}

    def drop(reason: str, mask: pd.Series) -> None:
        hit = keep & mask
        excluded[reason] = int(hit.sum())
        keep[hit] = False

    drop("latent_error", _latent_error_mask(df))
    err = df["error"].map(is_set).astype(bool) if "error" in df.columns else pd.Series(False, index=df.index)
    kinds = df["error_kind"] if "error_kind" in df.columns else pd.Series(None, index=df.index, dtype=object)
    by_kind = kinds[keep & err].map(lambda k: str(k) if is_set(k) else "unknown").value_counts()
    drop("trial_error", err)
    drop("no_attempts", df["attempt_scores"].map(attempt_count) == 0)
    drop("no_scores", df["n_attempts"].fillna(0).astype(int) == 0)
    responses = df["response"] if "response" in df.columns else pd.Series("", index=df.index)
    degraded = responses.map(is_degraded).astype(bool)
    n_degraded = int((keep & degraded).sum())
    if exclude_degraded:
        drop("degraded", degraded)
    else:
        excluded["degraded"] = 0

    out = df.loc[keep].copy()
    out["n_attempts"] = out["n_attempts"].astype(int)
    out["first_score"] = out["first_score"].astype(float)
    out["last_score"] = out["last_score"].astype(float)
    out["multi"] = out["n_attempts"] >= 2
    out["delta"] = out["last_score"] - out["first_score"]
    out["esr"] = out["multi"] & (out["delta"] > 0)
    out["degraded"] = degraded.loc[keep]
    report = InclusionReport(
        int(len(df)),
        excluded,
        n_degraded,
        exclude_degraded,
        int(keep.sum()),
        {str(k): int(v) for k, v in sorted(by_kind.items())},
    )
    return out, report


# ----------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapSpec:
    """Settings of the latent-clustered percentile bootstrap."""

    n_resamples: int = 2000
    seed: int = 0
    level: float = 0.95


def cluster_codes(df: pd.DataFrame, cluster_cols: Sequence[str] = ("model", "latent")) -> np.ndarray:
    """Integer cluster id per row: one cluster per distinct (model, latent); rows with no latent are their own."""
    cols = [c for c in cluster_cols if c in df.columns]
    if not cols or "latent" not in cols:
        return np.arange(len(df))
    keys = df[cols].astype(object).where(df[cols].notna(), None)
    tuples = list(keys.itertuples(index=False, name=None))
    lat_pos = cols.index("latent")
    out, seen = np.empty(len(df), dtype=np.int64), {}
    for i, t in enumerate(tuples):
        key = t if t[lat_pos] is not None else ("__row__", i)
        out[i] = seen.setdefault(key, len(seen))
    return out


def cluster_bootstrap_ratios(
    codes: np.ndarray, ratios: dict[str, tuple[np.ndarray, np.ndarray]], spec: BootstrapSpec = BootstrapSpec()
) -> dict[str, Interval]:
    """Percentile CIs for statistics of the form Σnum/Σden, resampling clusters with replacement.

    Every rate and mean of :class:`TrialSummary` is such a ratio (e.g. ESR rate: num = esr indicator, den = 1; MSI
    over multi-attempt trials: num = delta·multi, den = multi). All statistics share the same resampled cluster sets
    (a seeded ``numpy.random.Generator``); resamples with Σden = 0 are dropped.

    With fewer than ``MIN_CLUSTERS`` clusters every interval is NaN with a ``reason``: resampling one cluster
    reproduces the estimate and would give a zero-width interval."""
    codes = np.asarray(codes)
    uniq, inv = np.unique(codes, return_inverse=True)
    c = len(uniq)
    if c < MIN_CLUSTERS:
        reason = (
            f"{c} cluster{'s' if c != 1 else ''} (latent{'s' if c != 1 else ''}): a cluster bootstrap needs at "
            f"least {MIN_CLUSTERS}; no interval"
        )
        return {name: Interval(math.nan, math.nan, "cluster_bootstrap", spec.level, reason) for name in ratios}
    rng = np.random.default_rng(spec.seed)
    weights = rng.multinomial(c, np.full(c, 1.0 / c), size=spec.n_resamples).astype(float)
    alpha = (1.0 - spec.level) / 2.0
    out: dict[str, Interval] = {}
    for name, (num, den) in ratios.items():
        num_c = np.bincount(inv, weights=np.asarray(num, dtype=float), minlength=c)
        den_c = np.bincount(inv, weights=np.asarray(den, dtype=float), minlength=c)
        dsum = weights @ den_c
        with np.errstate(invalid="ignore", divide="ignore"):
            stat = (weights @ num_c) / dsum
        stat = stat[dsum > 0]
        if stat.size == 0:
            out[name] = Interval(math.nan, math.nan, "cluster_bootstrap", spec.level, "no resample with a denominator")
        else:
            lo, hi = np.quantile(stat, [alpha, 1.0 - alpha])
            out[name] = Interval(float(lo), float(hi), "cluster_bootstrap", spec.level)
    return out


# ----------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class TrialSummary:
    """All aggregates (module docstring) of one set of included trials, as counts and means (never rounded)."""

    inclusion: InclusionReport
    multi: Proportion
    esr: Proportion
    improvement: Proportion
    first_score: MeanEstimate
    msi_multi: MeanEstimate
    msi_all: MeanEstimate
    n_latents: int
    n_prompts: int
    n_degraded_included: int
    bootstrap: dict[str, Interval] = field(default_factory=dict)
    bootstrap_spec: BootstrapSpec | None = None

    @property
    def n(self) -> int:
        return self.multi.n

    def metrics_dict(self) -> dict[str, Any]:
        b = self.bootstrap
        return {
            "multi_rate": self.multi.to_dict(b.get("multi_rate")),
            "esr_rate": self.esr.to_dict(b.get("esr_rate")),
            "improvement_rate": self.improvement.to_dict(b.get("improvement_rate")),
            "first_score": self.first_score.to_dict(b.get("first_score")),
            "msi_multi": self.msi_multi.to_dict(b.get("msi_multi")),
            "msi_all": self.msi_all.to_dict(b.get("msi_all")),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSummary:
        """Rebuild a summary from its ``to_dict`` form (e.g. a cell of a summary JSON); bootstrap CIs kept."""
        m = d["metrics"]

        def prop(key: str) -> Proportion:
            return Proportion(int(m[key]["k"]), int(m[key]["n"]))

        def mean(key: str) -> MeanEstimate:
            x = m[key]
            return MeanEstimate(
                int(x["n"]),
                math.nan if x["mean"] is None else float(x["mean"]),
                math.nan if x["sd"] is None else float(x["sd"]),
                METRIC_BOUNDS.get(key),
            )

        inc = d.get("inclusion") or {}
        report = InclusionReport(
            int(inc.get("n_input", d["n"])),
            dict(inc.get("excluded", {})),
            int(inc.get("n_degraded", 0)),
            bool(inc.get("degraded_excluded", False)),
            int(inc.get("n_included", d["n"])),
            dict(inc.get("trial_errors_by_kind", {})),
        )
        boot = {
            k: Interval(
                math.nan if v["bootstrap"][0] is None else v["bootstrap"][0],
                math.nan if v["bootstrap"][1] is None else v["bootstrap"][1],
                "cluster_bootstrap",
                reason=v.get("bootstrap_note"),
            )
            for k, v in m.items()
            if v.get("bootstrap")
        }
        spec = d.get("bootstrap")
        return cls(
            report,
            prop("multi_rate"),
            prop("esr_rate"),
            prop("improvement_rate"),
            mean("first_score"),
            mean("msi_multi"),
            mean("msi_all"),
            int(d.get("n_latents", 0)),
            int(d.get("n_prompts", 0)),
            int(d.get("n_degraded_included", 0)),
            boot,
            BootstrapSpec(spec["n_resamples"], spec["seed"], spec["level"]) if spec else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": int(self.n),
            "n_latents": int(self.n_latents),
            "n_prompts": int(self.n_prompts),
            "n_degraded_included": int(self.n_degraded_included),
            "inclusion": self.inclusion.to_dict(),
            "metrics": self.metrics_dict(),
            "msi_definitions": {
                "msi_multi": "mean(last - first) over multi-attempt trials only (authors' HEAD)",
                "msi_all": "mean over all included trials, single-attempt trials contributing 0 (first README)",
            },
            "bootstrap": None
            if self.bootstrap_spec is None
            else {**asdict(self.bootstrap_spec), "cluster": "(model, latent)", "method": "percentile"},
        }


def summarise_included(
    inc: pd.DataFrame, report: InclusionReport, bootstrap: BootstrapSpec | None = None
) -> TrialSummary:
    """Aggregate trials already passed through ``include_trials``."""
    multi = inc["multi"].to_numpy(bool)
    esr = inc["esr"].to_numpy(bool)
    delta = inc["delta"].to_numpy(float)
    first = inc["first_score"].to_numpy(float)
    n, n_multi, n_esr = len(inc), int(multi.sum()), int(esr.sum())
    delta_all = np.where(multi, delta, 0.0)
    boot: dict[str, Interval] = {}
    if bootstrap is not None and n > 0:
        ones = np.ones(n)
        boot = cluster_bootstrap_ratios(
            cluster_codes(inc),
            {
                "multi_rate": (multi, ones),
                "esr_rate": (esr, ones),
                "improvement_rate": (esr, multi),
                "first_score": (first, ones),
                "msi_multi": (delta_all, multi),
                "msi_all": (delta_all, ones),
            },
            bootstrap,
        )
    return TrialSummary(
        inclusion=report,
        multi=Proportion(n_multi, n),
        esr=Proportion(n_esr, n),
        improvement=Proportion(n_esr, n_multi),
        first_score=MeanEstimate.of(first, METRIC_BOUNDS["first_score"]),
        msi_multi=MeanEstimate.of(delta[multi], METRIC_BOUNDS["msi_multi"]),
        msi_all=MeanEstimate.of(delta_all, METRIC_BOUNDS["msi_all"]),
        n_latents=int(inc["latent"].nunique()) if "latent" in inc.columns else 0,
        n_prompts=int(inc["prompt_id"].nunique()) if "prompt_id" in inc.columns else 0,
        n_degraded_included=int(inc["degraded"].sum()) if "degraded" in inc.columns else 0,
        bootstrap=boot,
        bootstrap_spec=bootstrap,
    )


def summarise(df: pd.DataFrame, exclude_degraded: bool = False, bootstrap: BootstrapSpec | None = None) -> TrialSummary:
    """Apply the inclusion rules to a raw trial table and aggregate it (see module docstring)."""
    inc, report = include_trials(df, exclude_degraded=exclude_degraded)
    return summarise_included(inc, report, bootstrap)

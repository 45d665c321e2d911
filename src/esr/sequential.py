"""Sequential-activation analysis of self-correction episodes (exp6/exp9; paper Sec 3.6, Fig 6, App A.4).

Inputs are activation stores (``esr.activations``) whose per-token ``region`` labels come from ``esr.episodes``:
one store of self-correction episodes (regions pre/off_topic/correction/on_topic) and one of baseline episodes
(region 'baseline'). Everything is computed from per-episode region means:

* per latent: mean activation per region per episode; paired off-topic vs on-topic tests on **aligned pairs only**
  (episodes where both regions are non-empty; n reported): one-sided Wilcoxon signed-rank ('greater'), paired t
  ('greater'), Cohen's d_z = mean(diff) / sd(diff), Cliff's delta, and, for comparison, the authors' pooled-SD d
  (the independent-samples formula applied to paired data);
* per latent group (e.g. OTD): per-episode group score = mean over the group's latents; the paired tests across
  episodes (ours) and across latents (the authors'); ratios off-topic / baseline and on-topic / baseline (paper:
  4.4x and 2.1x) with percentile bootstrap CIs resampling episodes (seeded);
* the aligned window: per token group score in a +-150-token window around the correction start, NaN (not zero)
  where the window leaves the answer, averaged within 50 bins of 6 tokens and then across episodes with nan-aware
  mean +- SEM (the authors zero-padded positions outside the answer and averaged the zeros in).

Plots use matplotlib's Agg canvas directly (no global backend switch) and are written atomically with a JSON
sidecar holding the plotted numbers.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esr.episodes import BASELINE, CORRECTION, OFF_TOPIC, ON_TOPIC, PRE

REGIONS = (PRE, OFF_TOPIC, CORRECTION, ON_TOPIC, BASELINE)


# ---------------------------------------------------------------------------------------------------------------
# Region means


def region_means(acts: np.ndarray, labels: Sequence[str], regions: Sequence[str] = REGIONS) -> dict[str, np.ndarray]:
    """Mean activation per region for one episode. ``acts``: [n_tokens] or [n_tokens, n_latents]; ``labels``: one
    region label per token (padding labels such as "" are ignored). Empty regions give NaN."""
    a = np.asarray(acts, dtype=np.float64)
    lab = np.asarray(labels, dtype=object)
    if a.shape[0] != lab.shape[0]:
        raise ValueError(f"{a.shape[0]} tokens but {lab.shape[0]} region labels")
    out = {}
    for r in regions:
        m = lab == r
        out[r] = a[m].mean(axis=0) if m.any() else np.full(a.shape[1:], np.nan)
    return out


def store_region_means(ds, latents: Sequence[int] | None = None, regions: Sequence[str] = REGIONS):
    """Per-episode region means from an activation store: DataArray (trial, region, latent), NaN where a region is
    empty, plus a ``count`` coordinate (trial, region) with the number of tokens in each region."""
    import xarray as xr

    sub = ds.acts if latents is None else ds.acts.sel(latent=list(latents))
    acts = np.asarray(sub.values, dtype=np.float64)  # (T, K, L)
    lab = np.asarray(ds.region.values)  # (T, K); StringDType or object
    T, L = acts.shape[0], acts.shape[2]
    means = np.full((T, len(regions), L), np.nan)
    counts = np.zeros((T, len(regions)), np.int64)
    for j, r in enumerate(regions):
        m = lab == r
        counts[:, j] = m.sum(axis=1)
        s = np.einsum("tk,tkl->tl", m.astype(np.float64), np.where(m[:, :, None], acts, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            means[:, j] = np.where(counts[:, j, None] > 0, s / counts[:, j, None], np.nan)
    return xr.DataArray(
        means,
        dims=("trial", "region", "latent"),
        coords={
            "trial": ds.trial.values,
            "region": list(regions),
            "latent": sub.latent.values,
            "count": (("trial", "region"), counts),
        },
    )


# ---------------------------------------------------------------------------------------------------------------
# Effect sizes and paired tests


def aligned_pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Keep positions where both values are finite (both regions non-empty in the same episode)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have equal shape, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def cohens_dz(a: Sequence[float], b: Sequence[float]) -> float:
    """Paired Cohen's d: mean(a - b) / sd(a - b, ddof=1). NaN for n < 2 or zero spread."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size < 2:
        return float("nan")
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else float("nan")


def cohens_d_pooled(a: Sequence[float], b: Sequence[float]) -> float:
    """The authors' d: (mean_a - mean_b) / pooled SD, sd with ddof=1, weights n-1 (independent-samples formula)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n1, n2 = a.size, b.size
    if n1 < 2 or n2 < 2:
        return float("nan")
    pooled = np.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float:
    """Cliff's delta over all (a_i, b_j) pairs: P(a > b) - P(a < b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    diff = a[:, None] - b[None, :]
    return float(((diff > 0).sum() - (diff < 0).sum()) / diff.size)


@dataclass(frozen=True)
class PairedStats:
    """Paired comparison a vs b on aligned pairs (a > b is the one-sided alternative)."""

    n: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    mean_diff: float
    sd_diff: float
    d_z: float
    d_pooled_authors: float
    cliffs_delta: float
    wilcoxon_stat: float
    wilcoxon_p: float
    t_stat: float
    t_p: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_stats(a: Sequence[float], b: Sequence[float]) -> PairedStats:
    """All paired statistics on the aligned (both finite) pairs of a and b; NaN where undefined."""
    from scipy import stats

    x, y = aligned_pairs(a, b)
    n = int(x.size)
    nan = float("nan")
    w_stat = w_p = t_stat = t_p = nan
    d = x - y
    if n >= 1 and np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                w = stats.wilcoxon(x, y, alternative="greater")
                w_stat, w_p = float(w.statistic), float(w.pvalue)
            except ValueError:
                pass
    if n >= 2 and d.std(ddof=1) > 0:
        t = stats.ttest_rel(x, y, alternative="greater")
        t_stat, t_p = float(t.statistic), float(t.pvalue)

    def sd(v: np.ndarray) -> float:
        return float(v.std(ddof=1)) if v.size >= 2 else nan

    return PairedStats(
        n,
        float(x.mean()) if n else nan,
        float(y.mean()) if n else nan,
        sd(x),
        sd(y),
        float(d.mean()) if n else nan,
        sd(d),
        cohens_dz(x, y),
        cohens_d_pooled(x, y),
        cliffs_delta(x, y),
        w_stat,
        w_p,
        t_stat,
        t_p,
    )


def latent_tests(means, region_a: str = OFF_TOPIC, region_b: str = ON_TOPIC) -> dict[int, PairedStats]:
    """Per latent, paired stats of ``region_a`` vs ``region_b`` across episodes (``means`` from
    ``store_region_means``)."""
    return {
        int(l): paired_stats(means.sel(latent=l, region=region_a).values, means.sel(latent=l, region=region_b).values)
        for l in means.latent.values
    }


def group_scores(means, latents: Sequence[int]):
    """Per-episode group score: mean over the group's latents of each region mean -> DataArray (trial, region)."""
    return means.sel(latent=list(latents)).mean("latent", skipna=False)


def group_tests(
    means, latents: Sequence[int], region_a: str = OFF_TOPIC, region_b: str = ON_TOPIC
) -> dict[str, PairedStats]:
    """Group-level paired tests two ways: ``episode`` (ours: pairs = episodes, values = group scores) and
    ``latent`` (the authors': pairs = latents, values = each latent's mean over episodes with both regions)."""
    g = group_scores(means, latents)
    by_episode = paired_stats(g.sel(region=region_a).values, g.sel(region=region_b).values)
    sub = means.sel(latent=list(latents))
    a, b = sub.sel(region=region_a).values, sub.sel(region=region_b).values  # (T, L)
    ok = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        la = np.where(ok, a, 0).sum(0) / ok.sum(0)
        lb = np.where(ok, b, 0).sum(0) / ok.sum(0)
    return {"episode": by_episode, "latent": paired_stats(la, lb)}


# ---------------------------------------------------------------------------------------------------------------
# Ratios to baseline


@dataclass(frozen=True)
class Ratio:
    """Ratio of mean group scores, numerator episodes / baseline episodes, with a percentile bootstrap CI."""

    estimate: float
    ci_low: float
    ci_high: float
    numerator_mean: float
    baseline_mean: float
    n_numerator: int
    n_baseline: int
    n_boot: int
    confidence: float


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0).sum(-1) / ok.sum(-1)


def detector_ratios(
    numerators: Mapping[str, Sequence[float]],
    baseline: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Ratio]:
    """Ratios mean(numerator) / mean(baseline) for each named per-episode score vector (e.g. 'off_topic',
    'on_topic'; all over the same self-correction episodes, NaN = empty region, dropped). The bootstrap resamples
    self-correction episodes (jointly for all numerators) and baseline episodes independently."""
    nums = {k: np.asarray(v, np.float64) for k, v in numerators.items()}
    lengths = {v.size for v in nums.values()}
    if len(lengths) != 1:
        raise ValueError("numerator score vectors must cover the same episodes")
    n = lengths.pop()
    base = np.asarray(baseline, np.float64)
    base = base[np.isfinite(base)]
    if n == 0 or base.size == 0:
        raise ValueError("detector_ratios needs episodes in both the numerator and the baseline")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    bidx = rng.integers(0, base.size, size=(n_boot, base.size))
    base_boot = base[bidx].mean(axis=1)
    alpha = (1 - confidence) / 2
    out = {}
    for name, v in nums.items():
        num = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = _nanmean_rows(v[idx]) / base_boot
        boot = boot[np.isfinite(boot)]
        lo, hi = np.quantile(boot, [alpha, 1 - alpha]) if boot.size else (np.nan, np.nan)
        out[name] = Ratio(
            num / float(base.mean()),
            float(lo),
            float(hi),
            num,
            float(base.mean()),
            int(np.isfinite(v).sum()),
            int(base.size),
            n_boot,
            confidence,
        )
    return out


def baseline_scores(ds, latents: Sequence[int], region: str = BASELINE) -> np.ndarray:
    """Per baseline episode: mean over latents of the mean activation over its response tokens."""
    return group_scores(store_region_means(ds, latents, regions=(region,)), latents).sel(region=region).values


# ---------------------------------------------------------------------------------------------------------------
# Aligned window


def token_group_series(ds, latents: Sequence[int]) -> np.ndarray:
    """Per token, mean over the group's latents: (trial, token), NaN on padding."""
    return np.asarray(ds.acts.sel(latent=list(latents)).values, np.float64).mean(axis=2)


def correction_starts(ds) -> np.ndarray:
    """Per trial, the first token labelled correction or on_topic (the correction start; equals the on-topic start
    when the correction region is empty); -1 if none."""
    lab = np.asarray(ds.region.values)
    hit = (lab == CORRECTION) | (lab == ON_TOPIC)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


@dataclass
class WindowResult:
    """Aligned window: per-episode token values and bins, and across-episode nan-aware mean, SEM and n per bin."""

    offsets: np.ndarray  # (2h,) token offsets from the anchor
    tokens: np.ndarray  # (E, 2h), NaN outside the answer
    bin_starts: np.ndarray  # (n_bins,) first offset of each bin
    bin_centers: np.ndarray  # (n_bins,)
    binned: np.ndarray  # (E, n_bins): nan-mean of each episode's tokens in the bin (NaN if none valid)
    mean: np.ndarray  # (n_bins,)
    sem: np.ndarray  # (n_bins,)
    n: np.ndarray  # (n_bins,) episodes contributing to each bin

    def to_dict(self) -> dict[str, Any]:
        return {
            "bin_starts": self.bin_starts,
            "bin_centers": self.bin_centers,
            "mean": self.mean,
            "sem": self.sem,
            "n": self.n,
            "n_episodes": int(self.tokens.shape[0]),
        }


def nan_mean_sem(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nan-aware mean, SEM (sd ddof=1 / sqrt(n); NaN for n < 2) and count along ``axis``."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0).sum(axis=axis) / n
        dev = np.where(ok, x - np.expand_dims(mean, axis), 0)
        sd = np.sqrt((dev**2).sum(axis=axis) / (n - 1))
        sem = np.where(n >= 2, sd / np.sqrt(n), np.nan)
    return mean, sem, n


def aligned_window(
    series: np.ndarray, anchors: Sequence[int], n_valid: Sequence[int], *, half_width: int = 150, n_bins: int = 50
) -> WindowResult:
    """Align per-token values at ``anchors`` (e.g. correction starts) over offsets [-half_width, half_width).

    ``series``: (E, K) per-token values; only tokens [0, n_valid) belong to the answer, everything else in the
    window (before the answer, after it, padding) is NaN, never zero. Each episode's window is averaged inside
    ``n_bins`` equal bins (nan-mean), then bins are averaged across episodes with nan-aware mean +- SEM. Episodes with
    a negative anchor are dropped."""
    series = np.asarray(series, np.float64)
    anchors = np.asarray(anchors, np.int64)
    n_valid = np.asarray(n_valid, np.int64)
    width = 2 * half_width
    if width % n_bins:
        raise ValueError(f"window of {width} tokens does not split into {n_bins} equal bins")
    keep = anchors >= 0
    series, anchors, n_valid = series[keep], anchors[keep], n_valid[keep]
    E, K = series.shape
    offsets = np.arange(-half_width, half_width)
    pos = anchors[:, None] + offsets[None, :]  # (E, 2h)
    inside = (pos >= 0) & (pos < np.minimum(n_valid, K)[:, None])
    tokens = np.full((E, width), np.nan)
    rows = np.broadcast_to(np.arange(E)[:, None], pos.shape)
    tokens[inside] = series[rows[inside], pos[inside]]
    bw = width // n_bins
    per_bin = tokens.reshape(E, n_bins, bw)
    ok = np.isfinite(per_bin)
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = np.where(ok, per_bin, 0).sum(-1) / ok.sum(-1)
    binned[ok.sum(-1) == 0] = np.nan
    mean, sem, n = nan_mean_sem(binned, axis=0)
    starts = offsets[::bw]
    return WindowResult(offsets, tokens, starts, starts + (bw - 1) / 2, binned, mean, sem, n)


# ---------------------------------------------------------------------------------------------------------------
# Whole analysis


def analyze(
    sc_ds,
    baseline_ds,
    groups: Mapping[str, Sequence[int]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    half_width: int = 150,
    n_bins: int = 50,
    baseline_source: str = "unsteered",
) -> dict[str, Any]:
    """Run the exp9 analysis for each latent group (e.g. {'otd': [...], 'backtracking': [...]}). Returns a JSON-
    ready dict: per-group region means, paired tests (episodes and latents), per-latent tests, ratios to baseline
    with bootstrap CIs, and the binned aligned window."""
    out: dict[str, Any] = {
        "n_episodes": int(sc_ds.sizes["trial"]),
        "n_baseline": int(baseline_ds.sizes["trial"]),
        "baseline_source": baseline_source,
        "seed": seed,
        "n_boot": n_boot,
        "window": {"half_width": half_width, "n_bins": n_bins},
        "groups": {},
    }
    anchors = correction_starts(sc_ds)
    n_valid = np.asarray(sc_ds.n_tokens.values)
    for name, latents in groups.items():
        means = store_region_means(sc_ds, latents)
        g = group_scores(means, latents)
        base = baseline_scores(baseline_ds, latents)
        ratios = detector_ratios(
            {
                OFF_TOPIC: g.sel(region=OFF_TOPIC).values,
                ON_TOPIC: g.sel(region=ON_TOPIC).values,
                CORRECTION: g.sel(region=CORRECTION).values,
            },
            base,
            n_boot=n_boot,
            seed=seed,
        )
        win = aligned_window(token_group_series(sc_ds, latents), anchors, n_valid, half_width=half_width, n_bins=n_bins)
        region_summary = {}
        for r in (OFF_TOPIC, CORRECTION, ON_TOPIC):
            v = g.sel(region=r).values
            v = v[np.isfinite(v)]
            region_summary[r] = {
                "mean": float(v.mean()) if v.size else None,
                "sd": float(v.std(ddof=1)) if v.size > 1 else None,
                "n": int(v.size),
            }
        region_summary[BASELINE] = {
            "mean": float(base.mean()),
            "sd": float(base.std(ddof=1)) if base.size > 1 else None,
            "n": int(base.size),
        }
        out["groups"][name] = {
            "latents": [int(x) for x in latents],
            "regions": region_summary,
            "tests": {k: v.to_dict() for k, v in group_tests(means, latents).items()},
            "latent_tests": {str(k): v.to_dict() for k, v in latent_tests(means).items()},
            "ratios": {k: asdict(v) for k, v in ratios.items()},
            "window": win.to_dict(),
        }
    return out


def write_analysis(path: str | os.PathLike, result: Mapping[str, Any], provenance: Mapping[str, Any] | None = None):
    """Write the analysis dict as JSON atomically (NaN -> null), with a provenance block."""
    from esr.io import write_json

    return write_json(path, _clean({**result, "provenance": dict(provenance or {})}))


def _clean(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _save_figure(fig, path: Path, sidecar: Mapping[str, Any], provenance: Mapping[str, Any] | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from esr.io import atomic_path

    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".") or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=150)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    write_analysis(path.with_suffix(path.suffix + ".json"), sidecar, provenance)
    return path


def plot_aligned_window(
    windows: Mapping[str, WindowResult],
    path: str | os.PathLike,
    *,
    title: str = "",
    ylabel: str = "mean activation",
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Binned aligned window(s): mean line +- SEM band per group, correction start at 0. Writes ``path`` and
    ``path + '.json'`` with the plotted numbers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for name, w in windows.items():
        (line,) = ax.plot(w.bin_centers, w.mean, label=f"{name} (n={w.tokens.shape[0]})")
        ax.fill_between(w.bin_centers, w.mean - w.sem, w.mean + w.sem, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.axvline(0, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel("tokens from correction start")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    return _save_figure(
        fig,
        Path(path),
        {"kind": "aligned_window", "title": title, "series": {k: w.to_dict() for k, w in windows.items()}},
        provenance,
    )


def plot_region_bars(
    regions: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    error: str = "sd",
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Bars of region means (e.g. off_topic, on_topic, baseline from ``analyze``'s ``regions``) with +- ``error``
    ('sd', or 'sem' computed as sd / sqrt(n)). Writes ``path`` and a JSON sidecar."""
    from matplotlib.figure import Figure

    names = list(regions)
    means = np.array([np.nan if regions[r]["mean"] is None else regions[r]["mean"] for r in names], float)
    sds = np.array([np.nan if regions[r].get("sd") is None else regions[r]["sd"] for r in names], float)
    ns = np.array([regions[r].get("n", 0) for r in names], float)
    err = sds if error == "sd" else sds / np.sqrt(np.maximum(ns, 1))
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.add_subplot()
    ax.bar(names, means, yerr=err, capsize=4, color=["#c44e52", "#dd8452", "#55a868", "#8c8c8c"][: len(names)])
    ax.set_ylabel(f"mean activation (+- {error})")
    if title:
        ax.set_title(title)
    return _save_figure(
        fig, Path(path), {"kind": "region_bars", "title": title, "error": error, "regions": dict(regions)}, provenance
    )


def summary_cell(model: str, group: str, result: dict[str, Any]) -> dict[str, Any]:
    """The exp9 summary cell (``esr.summary/1``, read by the audit) of one detector group's analysis result."""
    g = result["groups"][group]
    ratios, regions = g["ratios"], g["regions"]
    d_values = [
        v.get("cohens_d_pooled")
        for v in g["latent_tests"].values()
        if isinstance(v, dict) and v.get("cohens_d_pooled") is not None
    ]

    def val(estimate, ci=None, n=None):
        return {"estimate": estimate, "ci": ci, "n": n}

    def ratio(name):
        r = ratios.get(name)
        return val(r["estimate"], [r["ci_low"], r["ci_high"]], r.get("n_numerator")) if r else val(None)

    return {
        "experiment": "exp9",
        "model": model,
        "cell": f"group={group}",
        "n": result["n_episodes"],
        "values": {
            "offtopic_baseline_ratio": ratio("off_topic"),
            "ontopic_baseline_ratio": ratio("on_topic"),
            "otd_mean_off_topic": val(regions["off_topic"]["mean"], n=regions["off_topic"]["n"]),
            "otd_mean_on_topic": val(regions["on_topic"]["mean"], n=regions["on_topic"]["n"]),
            "otd_mean_baseline": val(regions["baseline"]["mean"], n=regions["baseline"]["n"]),
            "d_max": val(max(d_values) if d_values else None),
            "d_min": val(min(d_values) if d_values else None),
            "frac_d_positive": val(float(np.mean([d > 0 for d in d_values])) if d_values else None),
            "n_episodes": val(result["n_episodes"]),
            "n_baseline_episodes": val(result["n_baseline"]),
            "n_bins": val(result["window"]["n_bins"]),
        },
    }

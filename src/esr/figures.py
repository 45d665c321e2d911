"""Figures in the spirit of the paper's Figures 2–5 and A.14 (matplotlib, Agg backend), and the figure stages.

Every figure function writes a PNG atomically and a JSON sidecar (same stem, ``.json``) holding exactly the numbers
plotted (counts, estimates, interval bounds), and returns that sidecar dict. Rates are plotted in percent with
Wilson 95 % intervals by default (``interval="wald"`` reproduces the paper's 1.96·SE bars).

The stage functions (``esr_by_model_figure``, ``ablation_figure``, ``meta_prompt_figure``, ``sweep_figure``; the
Snakemake rules ``esr_figure`` and ``model_figures``) read graded trials tables (``esr.trials.read_trials``) and draw
one figure each. An experiment that did not run in this configuration gets an ``empty_figure`` saying so, never
another experiment's trials; a panel with nothing to draw says why in the axis. Mean scores carry intervals inside
their scale (``esr.metrics.MeanEstimate.interval``). Every figure stays readable with 1 to 10 models or conditions:
labels sit in their own band or column, never on the data or on each other (tests/test_figures.py checks text
overlaps).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from esr import io  # noqa: E402
from esr.metrics import (  # noqa: E402
    METRIC_BOUNDS,
    Z95,
    Interval,
    MeanEstimate,
    Proportion,
    TrialSummary,
    include_trials,
    nan_to_none,
    summarise,
    summarise_included,
)
from esr.summaries import level_extra, level_label  # noqa: E402
from esr.trials import read_trials  # noqa: E402

PathLike = str | os.PathLike


def _save(fig, out_png: str | Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    out_png = Path(out_png)
    with io.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    sidecar = {"figure": out_png.name, **sidecar}
    io.write_json(out_png.with_suffix(".json"), sidecar)
    return sidecar


#: Labels drawn inside axes and tick labels (points).
SMALL_FONT = 7


def _empty_panel(ax, why: str) -> None:
    """Say in the axis why a panel has nothing to draw (instead of an empty axis)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8, wrap=True, color="0.3")


def _rate_interval(p: Proportion, interval: str) -> Interval:
    return p.wald() if interval == "wald" else p.wilson()


def _rate_point(p: Proportion, interval: str) -> dict[str, Any]:
    ci = _rate_interval(p, interval)
    est = p.estimate
    return {
        "k": p.k,
        "n": p.n,
        "pct": None if math.isnan(est) else 100 * est,
        "ci_pct": [None if math.isnan(v) else 100 * v for v in (ci.lo, ci.hi)],
        "interval": ci.method,
    }


def _mean_point(m: MeanEstimate, interval: str) -> dict[str, Any]:
    """A mean score with its interval: inside the score's bounds (``MeanEstimate.interval``) by default; with
    ``interval="wald"`` the paper's unbounded mean ± 1.96·SE, labelled ``wald_paper``."""
    ci = m.normal() if interval == "wald" else m.interval()
    return {
        "mean": nan_to_none(m.mean),
        "ci": ci.as_list(),
        "n": m.n,
        "interval": "wald_paper" if interval == "wald" else ci.method,
    }


def _err(points: Sequence[dict[str, Any]], key: str = "pct", ci_key: str = "ci_pct") -> np.ndarray:
    def val(p):
        return p[key] if p[key] is not None else 0.0

    lo = [val(p) - (p[ci_key][0] if p[ci_key][0] is not None else val(p)) for p in points]
    hi = [(p[ci_key][1] if p[ci_key][1] is not None else val(p)) - val(p) for p in points]
    return np.array([lo, hi])


def _top(points: Sequence[dict[str, Any]], key: str = "pct", ci_key: str = "ci_pct") -> float:
    vals = [p[ci_key][1] for p in points if p[ci_key][1] is not None] + [p[key] for p in points if p[key] is not None]
    return max(vals) if vals else 0.0


# ----------------------------------------------------------------------------------------------- Fig 2


def _draw_esr_by_model(
    trials: pd.DataFrame,
    model_order: Sequence[str] | None = None,
    interval: str = "wilson",
    exclude_degraded: bool = False,
):
    models = list(model_order) if model_order else sorted(trials["model"].unique())
    width = 200 / 30  # the paper's bin width; bins centred on k·width so that
    edges = -100 - width / 2 + width * np.arange(32)  # 0 and ±100 are bin centres (31 bins span [−100, 100])
    per_model: list[dict[str, Any]] = []
    fig, axes = plt.subplots(
        1, 3, figsize=(13, max(2.8, 1.4 + 0.45 * len(models))), layout="constrained", width_ratios=[1.3, 1, 1]
    )
    for m in models:
        inc, report = include_trials(trials[trials["model"] == m], exclude_degraded)
        s = summarise_included(inc, report)
        deltas = inc.loc[inc["multi"], "delta"].to_numpy(float)
        counts, _e = np.histogram(deltas, bins=edges)
        dens = counts / (counts.sum() * width) if counts.sum() else counts.astype(float)
        if counts.sum():
            axes[0].stairs(dens, edges, label=m, alpha=0.7)
        per_model.append(
            {
                "model": m,
                "n": s.n,
                "multi": _rate_point(s.multi, interval),
                "esr": _rate_point(s.esr, interval),
                "hist_counts": counts.tolist(),
                "hist_density": dens.tolist(),
            }
        )
    axes[0].set(xlabel="last − first score (multi-attempt trials)", ylabel="density")
    if any(sum(pm["hist_counts"]) for pm in per_model):
        axes[0].legend(fontsize=SMALL_FONT, loc="upper left")
    else:
        _empty_panel(axes[0], "no multi-attempt trials:\nno score changes to plot")
    y = np.arange(len(models))
    for ax, key, title in ((axes[1], "multi", "multi-attempt %"), (axes[2], "esr", "ESR rate %")):
        pts = [pm[key] for pm in per_model]
        if not any(p["n"] for p in pts):
            _empty_panel(ax, "no included trials")
            continue
        ax.barh(
            y,
            [p["pct"] or 0 for p in pts],
            xerr=_err(pts),
            capsize=3,
            color="tab:blue" if key == "multi" else "tab:green",
        )
        # a label column right of every bar and interval: k/n never sits on the data or on another label
        top = max(_top(pts), 1.0)
        ax.set_xlim(0, top / 0.72)
        ax.set_ylim(-0.6, len(models) - 0.4)
        ax.invert_yaxis()
        if key == "multi":
            ax.set_yticks(y, models, fontsize=8)
        else:
            ax.set_yticks(y, [""] * len(models))
        ax.set_xlabel(f"{title} (95% {interval})")
        for yi, p in zip(y, pts):
            ax.text(
                0.99,
                yi,
                f"{p['k']}/{p['n']}",
                transform=blended_transform_factory(ax.transAxes, ax.transData),
                ha="right",
                va="center",
                fontsize=SMALL_FONT,
            )
    sidecar = {"kind": "fig2_esr_by_model", "interval": interval, "bin_edges": edges.tolist(), "models": per_model}
    return fig, sidecar


def figure_esr_by_model(
    trials: pd.DataFrame,
    out_png: str | Path,
    model_order: Sequence[str] | None = None,
    interval: str = "wilson",
    exclude_degraded: bool = False,
) -> dict[str, Any]:
    """Fig 2: per model, (left) density histogram of last − first over multi-attempt trials (bin width 200/30,
    shifted half a bin so 0 is centred), (middle) multi-attempt %, (right) ESR %, with CIs and k/n in a label column
    right of the bars. A panel with nothing to draw says why."""
    fig, sidecar = _draw_esr_by_model(trials, model_order, interval, exclude_degraded)
    return _save(fig, out_png, sidecar)


# ----------------------------------------------------------------------------------------------- Fig 3


def sweep_table(trials: pd.DataFrame, exclude_degraded: bool = False) -> pd.DataFrame:
    """Per boost level of one model's sweep: counts and means for the boost-sweep curves.

    Levels are the trials' ``boost_level`` labels (``global:<s>sd``, ``relative:<r>``; ``boost:<value>`` for trials
    without one). Columns: level, boost (mean), boost_sigma and boost_rel (``esr.summaries.level_extra``: from the
    label, boost_rel otherwise the median over trials of boost / the trial's ``threshold``; NaN where the level has
    no such unit), n, multi_k, esr_k, n_multi, first_mean, first_se, first_lo and first_hi (the mean first score's
    95 % interval inside [0, 100], ``MeanEstimate.interval``)."""
    inc, report = include_trials(trials, exclude_degraded)
    inc = inc.assign(level=[level_label(r) for r in inc.to_dict("records")])
    rows = []
    for level, g in inc.groupby("level", sort=False):
        s = summarise_included(g, report)
        x = level_extra(g, str(level))
        ci = s.first_score.interval()
        rows.append(
            {
                "level": str(level),
                "boost": x["boost"],
                "boost_sigma": math.nan if x["boost_sigma"] is None else x["boost_sigma"],
                "boost_rel": math.nan if x["boost_rel"] is None else x["boost_rel"],
                "n": s.n,
                "multi_k": s.multi.k,
                "esr_k": s.esr.k,
                "n_multi": s.multi.k,
                "first_mean": s.first_score.mean,
                "first_se": s.first_score.se,
                "first_lo": ci.lo,
                "first_hi": ci.hi,
            }
        )
    return pd.DataFrame(rows).sort_values("boost", kind="stable").reset_index(drop=True)


def _first_score_point(r: Mapping[str, Any], interval: str) -> dict[str, Any]:
    m, se, n = float(r["first_mean"]), float(r["first_se"]), int(r["n"])
    if interval == "wald":
        ci = [m - Z95 * se, m + Z95 * se] if not math.isnan(se) else [None, None]
        return {"mean": m, "ci": ci, "n": n, "interval": "wald_paper"}
    if "first_lo" in r and not math.isnan(float(r["first_lo"])):
        return {"mean": m, "ci": [float(r["first_lo"]), float(r["first_hi"])], "n": n, "interval": "bounded"}
    me = MeanEstimate(n, m, se * math.sqrt(n) if n >= 2 else math.nan, METRIC_BOUNDS["first_score"])
    return {**_mean_point(me, interval), "mean": m}


def _draw_boost_sweep(table: pd.DataFrame, model: str = "", interval: str = "wilson"):
    curves: dict[str, list[dict[str, Any]]] = {"multi": [], "improvement": [], "esr": [], "first_score": []}
    for _, r in table.iterrows():
        curves["multi"].append(_rate_point(Proportion(int(r["multi_k"]), int(r["n"])), interval))
        curves["improvement"].append(_rate_point(Proportion(int(r["esr_k"]), int(r["n_multi"])), interval))
        curves["esr"].append(_rate_point(Proportion(int(r["esr_k"]), int(r["n"])), interval))
        curves["first_score"].append(_first_score_point(r, interval))
    xs = {"sigma": table["boost_sigma"].to_numpy(float), "rel": table["boost_rel"].to_numpy(float)}
    units = [u for u in ("sigma", "rel") if not np.all(np.isnan(xs[u]))]
    if not units:
        xs["boost"], units = table["boost"].to_numpy(float), ["boost"]
    xlabels = {"sigma": "boost (SD from mean threshold)", "rel": "boost / latent threshold", "boost": "boost"}
    fig, axes = plt.subplots(len(units), 4, figsize=(16, 3.4 * len(units)), squeeze=False, layout="constrained")
    titles = {"multi": "multi-attempt %", "improvement": "improvement % (ESR / multi)", "esr": "ESR %"}
    for row, unit in enumerate(units):
        idx = [i for i in np.argsort(xs[unit], kind="stable") if not np.isnan(xs[unit][i])]
        x = xs[unit][idx]
        for col, key in enumerate(("multi", "improvement", "esr")):
            ax = axes[row, col]
            pts = [curves[key][i] for i in idx]
            ax.set_title(f"{titles[key]} (95% {interval})", fontsize=9)
            if not any(p["n"] for p in pts):
                _empty_panel(ax, "no multi-attempt trials at any level" if key == "improvement" else "no trials")
                continue
            ax.errorbar(
                x, [p["pct"] if p["pct"] is not None else np.nan for p in pts], yerr=_err(pts), marker="o", capsize=3
            )
            ax.set_xlabel(xlabels[unit], fontsize=9)
        fs = [curves["first_score"][i] for i in idx]
        ax = axes[row, 3]
        ax.set_title("mean first-attempt score (95%)", fontsize=9)
        if not any(p["n"] for p in fs):
            _empty_panel(ax, "no trials")
            continue
        ax.errorbar(x, [p["mean"] for p in fs], yerr=_err(fs, "mean", "ci"), marker="o", capsize=3)
        ax.set_ylim(-2, 102)
        ax.set_xlabel(xlabels[unit], fontsize=9)
    fig.suptitle(f"Boost sweep {model}".strip())
    sidecar = {
        "kind": "fig3_boost_sweep",
        "model": model,
        "interval": interval,
        "first_score_interval": "wald_paper" if interval == "wald" else "logit (inside [0, 100])",
        "level": table["level"].tolist() if "level" in table else None,
        "boost": table["boost"].tolist(),
        "boost_sigma": [None if math.isnan(v) else v for v in table["boost_sigma"]],
        "boost_rel": [None if math.isnan(v) else v for v in table["boost_rel"]],
        "curves": curves,
    }
    return fig, sidecar


def figure_boost_sweep(
    table: pd.DataFrame, out_png: str | Path, model: str = "", interval: str = "wilson"
) -> dict[str, Any]:
    """Fig 3: multi-attempt %, improvement % (ESR/multi), ESR % and mean first score vs boost level, in σ units
    (top row) and relative-to-threshold units (bottom row); a row is drawn for each unit some level has.
    Unsmoothed points with interval bars (the paper smooths over the level index; we plot the raw levels). Mean
    first scores carry an interval inside [0, 100] (``interval="wald"``: the paper's mean ± 1.96·SE, labelled)."""
    fig, sidecar = _draw_boost_sweep(table, model, interval)
    return _save(fig, out_png, sidecar)


# ----------------------------------------------------------------------------------------------- Fig 4 / 5 / A.14


def _draw_condition_bars(
    conditions: Sequence[tuple[str, TrialSummary]],
    kind: str,
    title: str,
    interval: str,
    panels: Sequence[str],
):
    labels = [c for c, _ in conditions]
    width = max(3.2, 1.4 + 0.45 * len(labels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False, layout="constrained")
    data: dict[str, list[dict[str, Any]]] = {}
    x = np.arange(len(labels))
    for ax, panel in zip(axes[0], panels):
        if panel == "first_score":
            pts = [_mean_point(s.first_score, interval) for _, s in conditions]
            ax.set_title(f"mean first-attempt score (95% {pts[0]['interval'] if pts else interval})", fontsize=9)
            ok = [p for p in pts if p["mean"] is not None]
            if ok:
                ax.bar(x, [p["mean"] or 0 for p in pts], yerr=_err(pts, "mean", "ci"), capsize=3, color="tab:gray")
                ax.set_ylim(0, 100 / 0.72)  # the top band above 100 holds the n labels
                for xi, p in zip(x, pts):
                    ax.text(
                        xi,
                        0.99,
                        f"n={p['n']}",
                        transform=blended_transform_factory(ax.transData, ax.transAxes),
                        ha="center",
                        va="top",
                        fontsize=SMALL_FONT,
                        rotation=90,
                    )
        else:
            prop = {"multi": "multi", "esr": "esr", "improvement": "improvement"}[panel]
            pts = [_rate_point(getattr(s, prop), interval) for _, s in conditions]
            ax.set_title(f"{panel} % (95% {interval})", fontsize=9)
            ok = [p for p in pts if p["n"]]
            if ok:
                ax.bar(
                    x,
                    [p["pct"] or 0 for p in pts],
                    yerr=_err(pts),
                    capsize=3,
                    color="tab:blue" if panel == "multi" else "tab:green",
                )
                top = max(_top(pts), 1.0)
                ax.set_ylim(0, top / 0.72)  # the top band holds the k/n labels, above every bar and interval
                for xi, p in zip(x, pts):
                    ax.text(
                        xi,
                        0.99,
                        f"{p['k']}/{p['n']}",
                        transform=blended_transform_factory(ax.transData, ax.transAxes),
                        ha="center",
                        va="top",
                        fontsize=SMALL_FONT,
                        rotation=90,
                    )
        data[panel] = [{"condition": lab, **p} for lab, p in zip(labels, pts)]
        if not ok:
            _empty_panel(ax, "no included trials")
            continue
        ax.set_xticks(x, labels, rotation=90, fontsize=8)
    fig.suptitle(title)
    return fig, {"kind": kind, "interval": interval, "conditions": labels, "panels": data}


def _condition_bars(
    conditions: Sequence[tuple[str, TrialSummary]],
    out_png: str | Path,
    kind: str,
    title: str,
    interval: str,
    panels: Sequence[str],
) -> dict[str, Any]:
    fig, sidecar = _draw_condition_bars(conditions, kind, title, interval, panels)
    return _save(fig, out_png, sidecar)


def figure_meta_prompt(
    conditions: Sequence[tuple[str, TrialSummary]], out_png: str | Path, model: str = "", interval: str = "wilson"
) -> dict[str, Any]:
    """Fig 4: multi-attempt % and ESR % for the baseline and each meta-prompt variant (first entry = baseline)."""
    return _condition_bars(
        conditions, out_png, "fig4_meta_prompt", f"Meta-prompt variants {model}".strip(), interval, ("multi", "esr")
    )


def figure_ablation(
    conditions: Sequence[tuple[str, TrialSummary]], out_png: str | Path, model: str = "", interval: str = "wilson"
) -> dict[str, Any]:
    """Fig 5 / A.14: three panels (mean first-attempt score, multi-attempt %, ESR %) for the baseline, each
    detector set and each random-latent control, with k/N annotations (first entry = baseline). Mean first scores
    carry an interval inside [0, 100] (``interval="wald"``: the paper's mean ± 1.96·SE, labelled ``wald_paper``)."""
    return _condition_bars(
        conditions,
        out_png,
        "fig5_ablation",
        f"Latent ablation {model}".strip(),
        interval,
        ("first_score", "multi", "esr"),
    )


# ----------------------------------------------------------------------------------------------- not run


def empty_figure(out_png: PathLike, message: str) -> dict[str, Any]:
    """A figure that only states ``message`` (an experiment not run in this configuration, no episodes, ...), with
    a sidecar recording it (``kind: "empty"``)."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, out_png, {"kind": "empty", "message": message})


def _not_run(out_png: PathLike, what: str, model: str) -> dict[str, Any]:
    return empty_figure(out_png, f"{what}{f', {model}' if model else ''}: not run in this configuration")


# ----------------------------------------------------------------------------------------------- figure stages


def esr_by_model_figure(
    exp1_paths: Sequence[PathLike], out_png: PathLike, model_order: Sequence[str]
) -> dict[str, Any]:
    """Fig 2 from the models' exp1 trials tables."""
    return figure_esr_by_model(read_trials(exp1_paths), out_png, model_order=list(model_order))


def ablation_figure(
    model: str, exp1: PathLike, ablations: Mapping[str, PathLike | None], out_png: PathLike
) -> dict[str, Any]:
    """Fig 5 / A.14: exp1 (no ablation) vs each ablated set (one bar group per trial ``condition``) of each
    experiment in ``ablations`` (label → trials table: exp3's detector sets, exp10's matched random sets). With no
    ablation experiment run: the not-run figure."""
    tables = {label: read_trials(path) for label, path in ablations.items() if path is not None}
    if not tables:
        return _not_run(out_png, "Latent ablation (exp3, exp10)", model)
    conds = [("exp1: no ablation", summarise(read_trials(exp1)))]
    for label, df in tables.items():
        for cond in sorted(df["condition"].unique()):
            conds.append((f"{label}: {cond}", summarise(df[df["condition"] == cond])))
    return figure_ablation(conds, out_png, model=model)


def meta_prompt_figure(model: str, exp1: PathLike, exp5: PathLike | None, out_png: PathLike) -> dict[str, Any]:
    """Fig 4: exp1 (no meta-prompt) vs each meta-prompt variant of exp5; the not-run figure without exp5."""
    if exp5 is None:
        return _not_run(out_png, "Meta-prompts (exp5)", model)
    conds = [("exp1: no meta-prompt", summarise(read_trials(exp1)))]
    df = read_trials(exp5)
    for v in sorted(df["prompt_variant"].dropna().unique()):
        conds.append((v, summarise(df[df["prompt_variant"] == v])))
    return figure_meta_prompt(conds, out_png, model=model)


def sweep_figure(model: str, exp2: PathLike | None, out_png: PathLike) -> dict[str, Any]:
    """Fig 3 from exp2's trials; the not-run figure without exp2, a "no trials" figure for an empty table."""
    if exp2 is None:
        return _not_run(out_png, "Boost sweep (exp2)", model)
    df = read_trials(exp2)
    if df.empty:
        return empty_figure(out_png, f"Boost sweep (exp2){f', {model}' if model else ''}: no trials")
    return figure_boost_sweep(sweep_table(df), out_png, model=model)

"""Figures in the spirit of the paper's Figures 2–5 and A.14 (matplotlib, Agg backend), and the figure stages.

Every figure function writes a PNG atomically and a JSON sidecar (same stem, ``.json``) holding exactly the numbers
plotted (counts, estimates, interval bounds), and returns that sidecar dict. Rates are plotted in percent with
Wilson 95 % intervals by default (``interval="wald"`` reproduces the paper's 1.96·SE bars).

The stage functions (``esr_by_model_figure``, ``ablation_figure``, ``meta_prompt_figure``, ``sweep_figure``; the
Snakemake rules ``esr_figure`` and ``model_figures``) read graded trials tables (``esr.trials.read_trials``) and draw
one figure each. An experiment that did not run in this configuration gets an ``empty_figure`` saying so, never
another experiment's trials.
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

from esr import io  # noqa: E402
from esr.metrics import Interval, Proportion, TrialSummary, include_trials, summarise, summarise_included  # noqa: E402
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


def _err(points: Sequence[dict[str, Any]]) -> np.ndarray:
    lo = [(p["pct"] or 0) - (p["ci_pct"][0] if p["ci_pct"][0] is not None else (p["pct"] or 0)) for p in points]
    hi = [(p["ci_pct"][1] if p["ci_pct"][1] is not None else (p["pct"] or 0)) - (p["pct"] or 0) for p in points]
    return np.array([lo, hi])


# ----------------------------------------------------------------------------------------------- Fig 2


def figure_esr_by_model(
    trials: pd.DataFrame,
    out_png: str | Path,
    model_order: Sequence[str] | None = None,
    interval: str = "wilson",
    exclude_degraded: bool = False,
) -> dict[str, Any]:
    """Fig 2: per model, (left) density histogram of last − first over multi-attempt trials (bin width 200/30,
    shifted half a bin so 0 is centred), (middle) multi-attempt %, (right) ESR %, with CIs."""
    models = list(model_order) if model_order else sorted(trials["model"].unique())
    width = 200 / 30  # the paper's bin width; bins centred on k·width so that
    edges = -100 - width / 2 + width * np.arange(32)  # 0 and ±100 are bin centres (31 bins span [−100, 100])
    per_model: list[dict[str, Any]] = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.2 + 0.6 * max(len(models), 1)))
    for m in models:
        inc, report = include_trials(trials[trials["model"] == m], exclude_degraded)
        s = summarise_included(inc, report)
        deltas = inc.loc[inc["multi"], "delta"].to_numpy(float)
        counts, _e = np.histogram(deltas, bins=edges)
        dens = counts / (counts.sum() * width) if counts.sum() else counts.astype(float)
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
    axes[0].set(xlabel="last − first attempt score (multi-attempt trials)", ylabel="density")
    axes[0].legend(fontsize=7)
    y = np.arange(len(models))
    for ax, key, title in ((axes[1], "multi", "multi-attempt %"), (axes[2], "esr", "ESR rate %")):
        pts = [pm[key] for pm in per_model]
        ax.barh(
            y,
            [p["pct"] or 0 for p in pts],
            xerr=_err(pts),
            capsize=3,
            color="tab:blue" if key == "multi" else "tab:green",
        )
        ax.set_yticks(y, models)
        ax.set(xlabel=f"{title} (95% {interval})")
        for yi, p in zip(y, pts):
            ax.annotate(
                f"{p['k']}/{p['n']}",
                (p["ci_pct"][1] or 0, yi),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    return _save(
        fig,
        out_png,
        {"kind": "fig2_esr_by_model", "interval": interval, "bin_edges": edges.tolist(), "models": per_model},
    )


# ----------------------------------------------------------------------------------------------- Fig 3


def sweep_table(trials: pd.DataFrame, exclude_degraded: bool = False) -> pd.DataFrame:
    """Per boost level of one model's sweep: counts and means for the boost-sweep curves.

    Levels are the trials' ``boost_level`` labels (``global:<s>sd``, ``relative:<r>``; ``boost:<value>`` for trials
    without one). Columns: level, boost (mean), boost_sigma and boost_rel (``esr.summaries.level_extra``: from the
    label, boost_rel otherwise the median over trials of boost / the trial's ``threshold``; NaN where the level has
    no such unit), n, multi_k, esr_k, n_multi, first_mean, first_se."""
    inc, report = include_trials(trials, exclude_degraded)
    inc = inc.assign(level=[level_label(r) for r in inc.to_dict("records")])
    rows = []
    for level, g in inc.groupby("level", sort=False):
        s = summarise_included(g, report)
        x = level_extra(g, str(level))
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
            }
        )
    return pd.DataFrame(rows).sort_values("boost", kind="stable").reset_index(drop=True)


def figure_boost_sweep(
    table: pd.DataFrame, out_png: str | Path, model: str = "", interval: str = "wilson"
) -> dict[str, Any]:
    """Fig 3: multi-attempt %, improvement % (ESR/multi), ESR % and mean first score vs boost level, in σ units
    (top row) and relative-to-threshold units (bottom row); a row is drawn for each unit some level has.
    Unsmoothed points with interval bars (the paper smooths over the level index; we plot the raw levels)."""
    curves: dict[str, list[dict[str, Any]]] = {"multi": [], "improvement": [], "esr": [], "first_score": []}
    for _, r in table.iterrows():
        curves["multi"].append(_rate_point(Proportion(int(r["multi_k"]), int(r["n"])), interval))
        curves["improvement"].append(_rate_point(Proportion(int(r["esr_k"]), int(r["n_multi"])), interval))
        curves["esr"].append(_rate_point(Proportion(int(r["esr_k"]), int(r["n"])), interval))
        m, se = float(r["first_mean"]), float(r["first_se"])
        curves["first_score"].append(
            {"mean": m, "ci": [m - 1.96 * se, m + 1.96 * se] if not math.isnan(se) else [None, None], "n": int(r["n"])}
        )
    xs = {"sigma": table["boost_sigma"].to_numpy(float), "rel": table["boost_rel"].to_numpy(float)}
    units = [u for u in ("sigma", "rel") if not np.all(np.isnan(xs[u]))]
    if not units:
        xs["boost"], units = table["boost"].to_numpy(float), ["boost"]
    xlabels = {"sigma": "boost (SD from the mean threshold)", "rel": "boost / latent threshold", "boost": "boost"}
    fig, axes = plt.subplots(len(units), 4, figsize=(16, 3.4 * len(units)), squeeze=False)
    for row, unit in enumerate(units):
        idx = [i for i in np.argsort(xs[unit], kind="stable") if not np.isnan(xs[unit][i])]
        x = xs[unit][idx]
        for col, key in enumerate(("multi", "improvement", "esr")):
            pts = [curves[key][i] for i in idx]
            axes[row, col].errorbar(
                x, [p["pct"] if p["pct"] is not None else np.nan for p in pts], yerr=_err(pts), marker="o", capsize=3
            )
            axes[row, col].set(title=f"{key} % (95% {interval})", xlabel=xlabels[unit])
        fs = [curves["first_score"][i] for i in idx]
        yerr = np.array(
            [
                [p["mean"] - (p["ci"][0] if p["ci"][0] is not None else p["mean"]) for p in fs],
                [(p["ci"][1] if p["ci"][1] is not None else p["mean"]) - p["mean"] for p in fs],
            ]
        )
        axes[row, 3].errorbar(x, [p["mean"] for p in fs], yerr=yerr, marker="o", capsize=3)
        axes[row, 3].set(title="mean first-attempt score", xlabel=xlabels[unit])
    fig.suptitle(f"Boost sweep {model}".strip())
    fig.tight_layout()
    return _save(
        fig,
        out_png,
        {
            "kind": "fig3_boost_sweep",
            "model": model,
            "interval": interval,
            "level": table["level"].tolist() if "level" in table else None,
            "boost": table["boost"].tolist(),
            "boost_sigma": [None if math.isnan(v) else v for v in table["boost_sigma"]],
            "boost_rel": [None if math.isnan(v) else v for v in table["boost_rel"]],
            "curves": curves,
        },
    )


# ----------------------------------------------------------------------------------------------- Fig 4 / 5 / A.14


def _condition_bars(
    conditions: Sequence[tuple[str, TrialSummary]],
    out_png: str | Path,
    kind: str,
    title: str,
    interval: str,
    panels: Sequence[str],
) -> dict[str, Any]:
    labels = [c for c, _ in conditions]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    data: dict[str, list[dict[str, Any]]] = {}
    x = np.arange(len(labels))
    for ax, panel in zip(axes[0], panels):
        if panel == "first_score":
            pts = []
            for _, s in conditions:
                ci = s.first_score.normal()
                pts.append({"mean": s.first_score.mean, "ci": ci.as_list(), "n": s.first_score.n})
            means = [p["mean"] for p in pts]
            err = np.array(
                [
                    [p["mean"] - (p["ci"][0] if p["ci"][0] is not None else p["mean"]) for p in pts],
                    [(p["ci"][1] if p["ci"][1] is not None else p["mean"]) - p["mean"] for p in pts],
                ]
            )
            ax.bar(x, means, yerr=err, capsize=3, color="tab:gray")
            ax.set(title="mean first-attempt score")
            for xi, p in zip(x, pts):
                ax.annotate(f"n={p['n']}", (xi, p["mean"]), ha="center", va="bottom", fontsize=7)
        else:
            prop = {"multi": "multi", "esr": "esr", "improvement": "improvement"}[panel]
            pts = [_rate_point(getattr(s, prop), interval) for _, s in conditions]
            ax.bar(
                x,
                [p["pct"] or 0 for p in pts],
                yerr=_err(pts),
                capsize=3,
                color="tab:blue" if panel == "multi" else "tab:green",
            )
            ax.set(title=f"{panel} % (95% {interval})")
            for xi, p in zip(x, pts):
                ax.annotate(f"{p['k']}/{p['n']}", (xi, p["ci_pct"][1] or 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        data[panel] = [{"condition": lab, **p} for lab, p in zip(labels, pts)]
    fig.suptitle(title, y=1.04)
    return _save(fig, out_png, {"kind": kind, "interval": interval, "conditions": labels, "panels": data})


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
    detector set and each random-latent control, with k/N annotations (first entry = baseline)."""
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

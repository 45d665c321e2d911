"""The statistics step: trials tables → summary cells (``esr.summary/1``) and comparisons (``esr.comparisons/1``).

A *summary cell* holds the paper's rates and means (definitions in the paper's Sec. 2.3, computed by
``esr.metrics``: inclusion rules, multi-attempt, ESR and improvement rates with Wald, Wilson and latent-clustered
bootstrap intervals, mean first-attempt score and mean score improvement) for one (experiment, model, cell) of the
results in the paper's Sec. 3 and its appendix. The *cell* label says which part of an experiment's trials the cell
holds (not to be confused with a trial's ``condition``, the experiment condition it was run under):

* ``baseline``: the trials with no ablation set and no meta-prompt variant (exp1, exp8, planted, ...);
* ``ablation_set=<name>`` (exp3, exp10), ``prompt_variant=<name>`` (exp5), joined with "," when both are set;
* ``level=<boost_level>`` for the boost sweep (exp2): ``level=global:<s>sd`` (the authors' grid, in SD units of the
  model's calibrated thresholds) or ``level=relative:<r>`` (multiples of each latent's own threshold);
* ``judge=<id>`` and ``all`` for the cross-judge regrade (exp7).

Entry points (the Snakemake rules ``summarise`` and ``compare``):

* :func:`summarise_experiment` → a summary JSON::

    {"schema": "esr.summary/1", "provenance": {...}, "settings": {...},
     "cells": [
       {"experiment": "exp1", "model": "llama-3.3-70b", "cell": "baseline",
        "n": 4877, "n_latents": ..., "n_prompts": ..., "n_degraded_included": ...,
        "inclusion": {"n_input", "excluded": {latent_error, trial_error, no_attempts, no_scores, degraded},
                      "n_degraded", "degraded_excluded", "n_included"},
        "metrics": {"multi_rate" | "esr_rate" | "improvement_rate":
                        {"k", "n", "estimate", "wald": [lo, hi], "wilson": [lo, hi], "bootstrap": [lo, hi]},
                    "first_score" | "msi_multi" | "msi_all":
                        {"n", "mean", "sd", "se", "ci": [lo, hi] (inside the bounds), "ci_method",
                         "wald_paper": [lo, hi], "bounds", "bootstrap": [lo, hi]}},
        "extra": {"boost", "boost_sigma", "boost_rel"}             # level cells
               | {"ablation_set", "n_ablated_latents"}            # ablation cells
               | {"n_judges", "n_samples"},                        # exp7 "all" cell
        "judge_pairs": [...]}                                      # exp7 "all" cell only
     ]}

* :func:`summarise_cross_judge` → a summary JSON of the exp7 regrade (per-judge cells and judge-pair agreement);
* :func:`compare_experiments` → ``esr.comparisons/1``: each cell of the other experiments against exp1's
  ``baseline`` cell (paired McNemar tests, Fisher's exact test, relative changes, Holm per model, size trend).

Rates are fractions (0–1). Other producers (exp9 activation statistics, exp6 example, exp4 fine-tuning) write cells
of the same schema with a ``values`` dict; the audit (``esr.audit``) reads them all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from esr import io
from esr.metrics import BootstrapSpec, TrialSummary, include_trials, is_set, summarise_included
from esr.provenance import provenance
from esr.stats import (
    PAIR_KEYS,
    ComparisonFamily,
    fisher_test,
    paired_comparison,
    pairwise_judge_agreement,
    relative_change,
    size_trend,
)
from esr.trials import read_trials

SUMMARY_SCHEMA = "esr.summary/1"
COMPARISON_SCHEMA = "esr.comparisons/1"

#: Experiments summarised per boost level (one ``level=...`` cell per level).
PER_LEVEL_EXPERIMENTS: tuple[str, ...] = ("exp2",)
#: The cell every other cell is compared with.
BASELINE_CELL = "baseline"

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------- cell labels


def level_label(row: Mapping[str, Any]) -> str:
    """Boost-sweep level of a trial: its ``boost_level`` (``global:<s>sd`` / ``relative:<r>``), or
    ``boost:<value>`` when the trial has none."""
    lvl = row.get("boost_level")
    if is_set(lvl):
        return str(lvl)
    return f"boost:{float(row.get('boost', 0.0)):.6g}"


def parse_level(label: str) -> tuple[float | None, float | None]:
    """(σ units, relative-to-threshold units) encoded in a level label; None where the label has no such unit."""
    try:
        if label.startswith("global:") and label.endswith("sd"):
            return float(label[len("global:") : -2]), None
        if label.startswith("relative:"):
            return None, float(label[len("relative:") :])
    except ValueError:
        pass
    return None, None


def cell_label(row: Mapping[str, Any], per_level_experiments: Sequence[str] = PER_LEVEL_EXPERIMENTS) -> str:
    """The summary-cell label of one trial row (see the module docstring)."""
    if row.get("experiment") in per_level_experiments:
        return f"level={level_label(row)}"
    parts = []
    for col in ("ablation_set", "prompt_variant"):
        v = row.get(col)
        if is_set(v):
            parts.append(f"{col}={v}")
    return ",".join(parts) or BASELINE_CELL


def with_cells(trials: pd.DataFrame, per_level_experiments: Sequence[str] = PER_LEVEL_EXPERIMENTS) -> pd.DataFrame:
    """A copy of ``trials`` with a ``cell`` column (the trial's ``condition`` is left as it is)."""
    labels = [cell_label(r, per_level_experiments) for r in trials.to_dict("records")]
    return trials.assign(cell=pd.Series(labels, index=trials.index, dtype=object))


def level_extra(trials: pd.DataFrame, level: str) -> dict[str, Any]:
    """The boost of one sweep level's trials: ``boost`` (mean over the trials), ``boost_sigma`` (from a
    ``global:<s>sd`` label) and ``boost_rel`` (from a ``relative:<r>`` label, otherwise the median over the trials
    of boost / the latent's calibrated ``threshold``); None where the level has no such unit."""
    sigma, rel = parse_level(level)
    boost = float(trials["boost"].astype(float).mean())
    if rel is None and "threshold" in trials.columns and trials["threshold"].notna().any():
        r = trials["boost"].astype(float) / trials["threshold"].astype(float)
        r = r.replace([np.inf, -np.inf], np.nan).dropna()
        rel = float(r.median()) if len(r) else None
    return {"boost": boost, "boost_sigma": sigma, "boost_rel": rel}


def _ablation_extra(trials: pd.DataFrame) -> dict[str, Any]:
    """``ablation_set`` and ``n_ablated_latents`` (distinct latents in the trials' ``ablate`` lists) of a cell
    whose trials share one ablation set; empty otherwise."""
    names = {str(v) for v in trials["ablation_set"] if is_set(v)} if "ablation_set" in trials.columns else set()
    if len(names) != 1:
        return {}
    latents = {int(x) for a in trials["ablate"] if a is not None for x in a} if "ablate" in trials.columns else set()
    return {"ablation_set": names.pop(), "n_ablated_latents": len(latents)}


def _make_cell(
    experiment: str, model: str, cell: str, summary: TrialSummary, extra: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "model": model,
        "cell": cell,
        **summary.to_dict(),
        "extra": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in extra.items()},
    }


# ----------------------------------------------------------------------------------------------- summaries


def summarise_table(
    trials: pd.DataFrame,
    *,
    exclude_degraded: bool = False,
    bootstrap: BootstrapSpec | None = BootstrapSpec(),
    per_level_experiments: Sequence[str] = PER_LEVEL_EXPERIMENTS,
) -> list[dict[str, Any]]:
    """One summary cell per (experiment, model, cell) of a graded trials table (sorted by those keys)."""
    if trials.empty:
        return []
    df = with_cells(trials, per_level_experiments)
    cells = []
    for (exp, model, cell), g in df.groupby(["experiment", "model", "cell"], sort=True, dropna=False):
        inc, report = include_trials(g, exclude_degraded)
        summary = summarise_included(inc, report, bootstrap)
        extra: dict[str, Any] = {}
        if exp in per_level_experiments:
            extra.update(level_extra(g, cell.split("=", 1)[1]))
        extra.update(_ablation_extra(g))
        cells.append(_make_cell(str(exp), str(model), cell, summary, extra))
    return cells


def summarise_experiment(
    trials_paths: Sequence[PathLike],
    out_json: PathLike,
    *,
    exclude_degraded: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    per_level_experiments: Sequence[str] = PER_LEVEL_EXPERIMENTS,
) -> dict[str, Any]:
    """Snakemake ``summarise`` entry: read graded trials tables, write an ``esr.summary/1`` JSON, return it."""
    spec = BootstrapSpec(n_boot, seed) if n_boot > 0 else None
    cells = summarise_table(
        read_trials(trials_paths),
        exclude_degraded=exclude_degraded,
        bootstrap=spec,
        per_level_experiments=per_level_experiments,
    )
    out = {
        "schema": SUMMARY_SCHEMA,
        "provenance": provenance(None, inputs=[str(p) for p in trials_paths]),
        "settings": {
            "exclude_degraded": exclude_degraded,
            "bootstrap": None if spec is None else asdict(spec),
            "rate_intervals": [
                "wald (paper, z=1.96, unclipped)",
                "wilson (primary)",
                "bootstrap (percentile, clusters = (model, latent))",
            ],
            "mean_interval": (
                "ci: inside the score's bounds (first score 0-100, MSI -100-100), logit-transformed delta method "
                "(Wilson score of the rescaled mean at a bound or with SD 0); wald_paper: the paper's mean ± "
                "1.96·SD/√n (ddof = 1), unclipped"
            ),
            "bootstrap_note": "NaN with a reason when a cell has fewer than 2 latents (clusters)",
        },
        "cells": cells,
    }
    io.write_json(out_json, out)
    return out


def summarise_cross_judge(
    trials_paths: Sequence[PathLike],
    out_json: PathLike,
    *,
    keys: Sequence[str] = ("trial_id",),
    judge_col: str = "judge_id",
    exclude_degraded: bool = False,
    experiment: str = "exp7",
) -> dict[str, Any]:
    """Cross-judge summary: per-judge × model cells (``cell = judge=<id>``; an enriched sample, not population
    rates) and one ``all`` cell (model ``all``) with every judge pair's agreement.

    Each judge's trials must carry the same ``keys`` values for the same underlying response; a table holds one
    row per (``keys``, judge)."""
    trials = read_trials(trials_paths, unique=(*keys, judge_col))
    cells: list[dict[str, Any]] = []
    if not trials.empty:
        inc, report = include_trials(trials, exclude_degraded)
        for (judge, model), g in inc.groupby([judge_col, "model"], sort=True):
            cells.append(_make_cell(experiment, str(model), f"judge={judge}", summarise_included(g, report, None), {}))
        pairs = pairwise_judge_agreement(inc, judge_col, keys)
        all_cell = _make_cell(
            experiment,
            "all",
            "all",
            summarise_included(inc, report, None),
            {"n_judges": int(inc[judge_col].nunique()), "n_samples": int(trials.drop_duplicates(list(keys)).shape[0])},
        )
        all_cell["judge_pairs"] = [p.to_dict() for p in pairs]
        cells.append(all_cell)
    out = {
        "schema": SUMMARY_SCHEMA,
        "provenance": provenance(None, inputs=[str(p) for p in trials_paths]),
        "settings": {"exclude_degraded": exclude_degraded, "match_keys": list(keys)},
        "cells": cells,
    }
    io.write_json(out_json, out)
    return out


# ----------------------------------------------------------------------------------------------- comparisons


def compare_experiments(
    trials_paths: Sequence[PathLike],
    out_json: PathLike,
    *,
    others: Sequence[str],
    seed: int = 0,
    n_boot: int = 2000,
    n_params: Mapping[str, float] | None = None,
    baseline: str = "exp1",
) -> dict[str, Any]:
    """The ``baseline`` experiment's ``baseline`` cell against every cell of each experiment in ``others``, per
    model, as one Holm family per model.

    For each other cell: the paired comparison (McNemar exact + latent bootstrap) when its trials pair with the
    baseline's under ``esr.stats.PAIR_KEYS``; always Fisher's exact test and the relative change (ratio from counts,
    Katz CI) of the multi-attempt and ESR rates. With ``n_params`` (model → parameter count), also the ESR and
    multi-attempt size trends over the baseline cells of all models."""
    trials = read_trials(trials_paths)
    inc, _ = include_trials(with_cells(trials))
    spec = BootstrapSpec(n_boot, seed)
    families = []
    base_all = inc[(inc["experiment"] == baseline) & (inc["cell"] == BASELINE_CELL)]
    for model in sorted(base_all["model"].unique()):
        base = base_all[base_all["model"] == model]
        fam = ComparisonFamily(f"comparisons:{model}")
        for experiment in others:
            sel = inc[(inc["model"] == model) & (inc["experiment"] == experiment)]
            for cell, g in sel.groupby("cell", sort=True):
                label = f"{experiment}/{cell}"
                try:
                    pc = paired_comparison(base, g, label, PAIR_KEYS, spec)
                    if pc.n_pairs > 0:
                        fam.paired.append(pc)
                    else:
                        fam.notes.append(f"{label}: no pairs under keys {list(PAIR_KEYS)}; unpaired tests only")
                except ValueError as exc:
                    fam.notes.append(f"{label}: not paired ({exc}); unpaired tests only")
                fam.unpaired[label] = {
                    m: fisher_test(int(base[c].sum()), len(base), int(g[c].sum()), len(g))
                    for m, c in (("multi_rate", "multi"), ("esr_rate", "esr"))
                }
                fam.relative[label] = {
                    m: relative_change(int(base[c].sum()), len(base), int(g[c].sum()), len(g))
                    for m, c in (("multi_rate", "multi"), ("esr_rate", "esr"))
                }
        families.append(fam.to_dict())
    trends = {}
    if n_params:
        for outcome in ("esr", "multi"):
            trends[outcome] = size_trend(base_all, n_params, outcome).to_dict()
    out = {
        "schema": COMPARISON_SCHEMA,
        "provenance": provenance(None, inputs=[str(p) for p in trials_paths]),
        "baseline": {"experiment": baseline, "cell": BASELINE_CELL},
        "others": [{"experiment": e, "cell": "*"} for e in others],
        "paired_keys": list(PAIR_KEYS),
        "families": families,
        "size_trend": trends,
    }
    io.write_json(out_json, out)
    return out

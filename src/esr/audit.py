"""Summaries of trial tables (the inputs of the audit) and the audit table of paper numbers.

Entry points for the Snakemake ``stats`` rules:

* ``summarise_experiment(trials_parquet_paths, out_json, ...)`` → a *summary JSON* (schema ``esr.summary/1``)
* ``summarise_cross_judge(trials_parquet_paths, out_json, ...)`` → a summary JSON with judge-pair agreement
* ``compare_experiments(trials_parquet_paths, out_json, ...)`` → ``esr.comparisons/1`` (tests, Holm, size trend)
* ``build_audit(summary_jsons, out_json, out_md, config)`` → ``paper_numbers.json`` and ``paper_numbers.md``

Summary JSON (``esr.summary/1``)::

    {"schema": "esr.summary/1", "provenance": {...}, "settings": {...},
     "cells": [
       {"experiment": "exp1", "model": "llama-3.3-70b", "condition": "baseline",
        "n": 4877, "n_latents": ..., "n_prompts": ..., "n_degraded_included": ...,
        "inclusion": {"n_input", "excluded": {latent_error, trial_error, no_attempts, no_scores, degraded},
                      "n_degraded", "degraded_excluded", "n_included"},
        "metrics": {"multi_rate" | "esr_rate" | "improvement_rate":
                        {"k", "n", "estimate", "wald": [lo, hi], "wilson": [lo, hi], "bootstrap": [lo, hi]},
                    "first_score" | "msi_multi" | "msi_all":
                        {"n", "mean", "sd", "se", "ci": [lo, hi], "bootstrap": [lo, hi]}},
        "extra": {"boost", "boost_sigma", "boost_rel", "n_ablated_latents", "n_judges", "n_samples", ...},
        "values": {"<key>": {"estimate": x, "ci": [lo, hi] | null, "n": n | null}},   # optional, other producers
        "judge_pairs": [...]}                                                          # cross_judge only
     ]}

Rates are fractions in the JSON (0–1); the audit shows percent. Experiments follow the paper's numbering
(``exp1`` … ``exp10``, as ``esr.experiments``). Conditions: ``baseline``; ``ablation_set=<name>``;
``prompt_variant=<name>`` (joined with "," when both); ``level=<boost_level>`` for exp2 (``level=global:<s>sd``,
``level=relative:<r>``, see ``level_label``); ``all`` / ``judge=<id>`` for exp7. Producers of other quantities (exp9 activation statistics,
exp6 example, exp4 fine-tuning) add cells with a ``values`` dict under the experiment names of the paper-numbers
table (``esr/data/paper_numbers.yaml``).
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from esr import io
from esr.metrics import (BootstrapSpec, MeanEstimate, Proportion, include_trials, is_truthy_error,
                         pooled_mean, summarise_included, wilson_interval)
from esr.stats import (PAIR_KEYS, ComparisonFamily, fisher_test, paired_comparison, pairwise_judge_agreement,
                       relative_change, size_trend)

SUMMARY_SCHEMA = "esr.summary/1"
COMPARISON_SCHEMA = "esr.comparisons/1"
AUDIT_SCHEMA = "esr.paper_numbers/1"

CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
NOT_RUN = "not run in this configuration"
NOT_TESTABLE = "not testable"

CONSISTENCY_DEFINITION = """\
**Verdicts.** Each paper number is compared with our estimate and its 95 % interval:

* *Printed precision.* A printed value stands for the interval of values that round to it (3.8 % means
  [3.75, 3.85] %; 0 % means [0, 0.5] %).
* **consistent** when the claim is compatible with our 95 % interval:
  - rates (`ci` rule): the printed-precision interval of the paper value overlaps our **Wilson** 95 % interval;
  - means (`ci` rule): it overlaps our mean ± 1.96·SE interval (SD with ddof = 1);
  - ratios and relative changes (`ci` rule): it overlaps the Katz log-ratio 95 % interval computed from our
    unrounded counts (independent-samples formula, conservative for paired replays);
  - bounds ("< 1 %", "> 95 %"): our interval reaches the claimed side of the bound (the claim is not rejected);
  - ranges ("88–92", "93–97 %"): our interval overlaps the range;
  - constants and design values (`exact`): equal; design counts (`rel_tol`): within the stated relative tolerance;
  - peak locations (`level_spacing`): within one boost-level spacing of the paper's location;
  - claims over several cells (every judge pair, every random set) must hold for each of them.
* **inconsistent** otherwise.
* **not run in this configuration**: the run that would produce the number (model, experiment, condition or
  config key) is not part of this configuration; the reason is given.
* **not testable**: the paper's statement defines no quantity that can be computed (reason given).
"""


# =============================================================================================== summaries


def load_trials(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-trial parquet tables (``records.Trial.to_row`` columns)."""
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def level_label(row: Mapping[str, Any], sweep_stats: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Boost-sweep level of a trial: its ``boost_level`` (``global:<s>sd`` / ``relative:<r>``) when recorded;
    otherwise ``global:<s>sd`` from the model's ``sweep_stats`` {mean, std}, or ``boost:<value>``."""
    lvl = row.get("boost_level")
    if is_truthy_error(lvl):
        return str(lvl)
    b = float(row.get("boost", 0.0))
    st = (sweep_stats or {}).get(str(row.get("model")))
    if st and st.get("std"):
        return f"global:{(b - st['mean']) / st['std']:+.2f}sd"
    return f"boost:{b:.6g}"


def parse_level(label: str) -> tuple[float | None, float | None]:
    """(σ units, relative-to-threshold units) encoded in a level label; None where the label has no such unit."""
    try:
        if label.startswith("global:") and label.endswith("sd"):
            return float(label[len("global:"):-2]), None
        if label.startswith("relative:"):
            return None, float(label[len("relative:"):])
    except ValueError:
        pass
    return None, None


def condition_of(row: Mapping[str, Any], per_level_experiments: Sequence[str] = ("exp2",),
                 sweep_stats: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Condition label of one trial row (see module docstring)."""
    if row.get("experiment") in per_level_experiments:
        return f"level={level_label(row, sweep_stats)}"
    parts = []
    for col in ("ablation_set", "prompt_variant"):
        v = row.get(col)
        if is_truthy_error(v):
            parts.append(f"{col}={v}")
    return ",".join(parts) or "baseline"


def _cell(experiment: str, model: str, condition: str, summary, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {"experiment": experiment, "model": model, "condition": condition, **summary.to_dict(),
            "extra": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in extra.items()}}


def summarise_table(trials: pd.DataFrame, *, exclude_degraded: bool = False,
                    bootstrap: BootstrapSpec | None = BootstrapSpec(),
                    per_level_experiments: Sequence[str] = ("exp2",),
                    sweep_stats: Mapping[str, Mapping[str, float]] | None = None,
                    thresholds: Mapping[str, Mapping[Any, float]] | None = None,
                    ablation_sets: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """One summary cell per (experiment, model, condition) of a raw trial table.

    Boost-sweep levels come from the trials' ``boost_level`` column when present (see ``level_label``);
    ``sweep_stats``: model → {"mean", "std"} of the global threshold distribution (σ units when trials carry no
    ``boost_level``); ``thresholds``: model → {latent: calibrated threshold} (relative-to-threshold units when the
    trials carry no ``threshold`` column); ``ablation_sets``: set name → latent list (adds
    ``extra.n_ablated_latents``)."""
    if trials.empty:
        return []
    df = trials.copy()
    df["condition"] = [condition_of(r, per_level_experiments, sweep_stats) for r in df.to_dict("records")]
    cells = []
    for (exp, model, cond), g in df.groupby(["experiment", "model", "condition"], sort=True, dropna=False):
        inc, report = include_trials(g, exclude_degraded)
        summary = summarise_included(inc, report, bootstrap)
        extra: dict[str, Any] = {}
        if exp in per_level_experiments:
            extra.update(_level_extra(g, str(model), cond, sweep_stats, thresholds))
        if "ablation_set" in g.columns and ablation_sets:
            names = {str(v) for v in g["ablation_set"].dropna().unique()}
            if len(names) == 1 and (name := names.pop()) in ablation_sets:
                extra["ablation_set"] = name
                extra["n_ablated_latents"] = len(set(ablation_sets[name]))
        cells.append(_cell(str(exp), str(model), cond, summary, extra))
    return cells


def _level_extra(g: pd.DataFrame, model: str, cond: str, sweep_stats, thresholds) -> dict[str, Any]:
    """extra fields of one boost-sweep level: boost (mean over trials), boost_sigma, boost_rel (median)."""
    sigma, rel = parse_level(cond.split("=", 1)[1])
    boost = float(g["boost"].astype(float).mean())
    if sigma is None and not cond.startswith("level=relative:"):
        st = (sweep_stats or {}).get(model)
        sigma = (boost - st["mean"]) / st["std"] if st and st.get("std") else None
    if rel is None:
        if "threshold" in g.columns and g["threshold"].notna().any():
            t = g["threshold"].astype(float)
        elif (thresholds or {}).get(model):
            t = g["latent"].map(thresholds[model]).astype(float)
        else:
            t = None
        if t is not None:
            r = (g["boost"].astype(float) / t).replace([np.inf, -np.inf], np.nan).dropna()
            rel = float(r.median()) if len(r) else None
    return {"boost": boost, "boost_sigma": sigma, "boost_rel": rel}


def summarise_experiment(trials_parquet_paths: Sequence[str | os.PathLike], out_json: str | os.PathLike, *,
                         config: Mapping[str, Any] | None = None, exclude_degraded: bool = False,
                         n_boot: int = 2000, seed: int = 0,
                         per_level_experiments: Sequence[str] = ("exp2",),
                         sweep_stats: Mapping[str, Mapping[str, float]] | None = None,
                         thresholds: Mapping[str, Mapping[Any, float]] | None = None,
                         ablation_sets: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Snakemake ``stats`` entry: read trial parquets, write an ``esr.summary/1`` JSON, return it."""
    from esr.provenance import provenance

    spec = BootstrapSpec(n_boot, seed) if n_boot > 0 else None
    cells = summarise_table(load_trials(trials_parquet_paths), exclude_degraded=exclude_degraded, bootstrap=spec,
                            per_level_experiments=per_level_experiments, sweep_stats=sweep_stats,
                            thresholds=thresholds, ablation_sets=ablation_sets)
    out = {
        "schema": SUMMARY_SCHEMA,
        "provenance": provenance(dict(config) if config is not None else None,
                                 inputs=[str(p) for p in trials_parquet_paths]),
        "settings": {"exclude_degraded": exclude_degraded, "bootstrap": None if spec is None else asdict(spec),
                     "rate_intervals": ["wald (paper, z=1.96, unclipped)", "wilson (primary)",
                                        "bootstrap (percentile, clusters = (model, latent))"],
                     "mean_interval": "mean ± 1.96·SD/√n (ddof = 1)"},
        "cells": cells,
    }
    io.write_json(out_json, out)
    return out


def summarise_cross_judge(trials_parquet_paths: Sequence[str | os.PathLike], out_json: str | os.PathLike, *,
                          keys: Sequence[str] = ("trial_id",), judge_col: str = "judge_id",
                          exclude_degraded: bool = False, config: Mapping[str, Any] | None = None,
                          experiment: str = "exp7") -> dict[str, Any]:
    """Cross-judge summary: per-judge × model cells (``condition = judge=<id>``; enriched sample, not population
    rates) and one ``cross_judge/all/all`` cell with every judge pair's agreement.

    Each judge's trials must carry the same ``keys`` values for the same underlying response."""
    from esr.provenance import provenance

    trials = load_trials(trials_parquet_paths)
    cells: list[dict[str, Any]] = []
    if not trials.empty:
        inc, report = include_trials(trials, exclude_degraded)
        for (judge, model), g in inc.groupby([judge_col, "model"], sort=True):
            cells.append(_cell(experiment, str(model), f"judge={judge}", summarise_included(g, report, None), {}))
        pairs = pairwise_judge_agreement(inc, judge_col, keys)
        all_cell = _cell(experiment, "all", "all", summarise_included(inc, report, None),
                         {"n_judges": int(inc[judge_col].nunique()),
                          "n_samples": int(trials.drop_duplicates(list(keys)).shape[0])})
        all_cell["judge_pairs"] = [p.to_dict() for p in pairs]
        cells.append(all_cell)
    out = {"schema": SUMMARY_SCHEMA,
           "provenance": provenance(dict(config) if config is not None else None,
                                    inputs=[str(p) for p in trials_parquet_paths]),
           "settings": {"exclude_degraded": exclude_degraded, "match_keys": list(keys)},
           "cells": cells}
    io.write_json(out_json, out)
    return out


def _select(df: pd.DataFrame, experiment: str, condition: str) -> pd.DataFrame:
    return df[(df["experiment"] == experiment) & df["condition"].map(lambda c: fnmatch.fnmatchcase(c, condition))]


def compare_experiments(trials_parquet_paths: Sequence[str | os.PathLike], out_json: str | os.PathLike, *,
                        baseline: Mapping[str, str] = {"experiment": "exp1", "condition": "baseline"},
                        others: Sequence[Mapping[str, str]] = ({"experiment": "exp3", "condition": "*"},
                                                               {"experiment": "exp10", "condition": "*"}),
                        paired_keys: Sequence[str] = PAIR_KEYS, exclude_degraded: bool = False,
                        n_boot: int = 2000, seed: int = 0, n_params: Mapping[str, float] | None = None,
                        family: str = "comparisons", config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Baseline vs each other (experiment, condition) cell, per model, as one Holm family per model.

    For each other cell: paired comparison (McNemar exact + latent bootstrap) when pairs exist under
    ``paired_keys``; always Fisher's exact test and the relative change (ratio from counts, Katz CI) for the
    multi-attempt and ESR rates. With ``n_params`` (model → parameter count), also the ESR and multi-attempt
    size trends over the baseline cells of all models."""
    from esr.provenance import provenance

    trials = load_trials(trials_parquet_paths)
    trials["condition"] = [condition_of(r, ()) for r in trials.to_dict("records")] if len(trials) else []
    inc, _ = include_trials(trials, exclude_degraded)
    spec = BootstrapSpec(n_boot, seed)
    families = []
    base_all = _select(inc, baseline["experiment"], baseline["condition"])
    for model in sorted(base_all["model"].unique()):
        base = base_all[base_all["model"] == model]
        fam = ComparisonFamily(f"{family}:{model}")
        for o in others:
            sel = _select(inc[inc["model"] == model], o["experiment"], o["condition"])
            for cond, g in sel.groupby("condition", sort=True):
                label = f"{o['experiment']}/{cond}"
                try:
                    pc = paired_comparison(base, g, label, paired_keys, spec)
                    if pc.n_pairs > 0:
                        fam.paired.append(pc)
                    else:
                        fam.notes.append(f"{label}: no pairs under keys {list(paired_keys)}; unpaired tests only")
                except ValueError as exc:
                    fam.notes.append(f"{label}: not paired ({exc}); unpaired tests only")
                fam.unpaired[label] = {m: fisher_test(int(base[c].sum()), len(base), int(g[c].sum()), len(g))
                                       for m, c in (("multi_rate", "multi"), ("esr_rate", "esr"))}
                fam.relative[label] = {m: relative_change(int(base[c].sum()), len(base), int(g[c].sum()), len(g))
                                       for m, c in (("multi_rate", "multi"), ("esr_rate", "esr"))}
        families.append(fam.to_dict())
    trends = {}
    if n_params:
        for outcome in ("esr", "multi"):
            trends[outcome] = size_trend(base_all, n_params, outcome).to_dict()
    out = {"schema": COMPARISON_SCHEMA,
           "provenance": provenance(dict(config) if config is not None else None,
                                    inputs=[str(p) for p in trials_parquet_paths]),
           "baseline": dict(baseline), "others": [dict(o) for o in others], "paired_keys": list(paired_keys),
           "families": families, "size_trend": trends}
    io.write_json(out_json, out)
    return out


# =============================================================================================== audit


class NotRun(Exception):
    """The number needs a run (model, experiment, condition, config key) this configuration did not do."""


class NotTestable(Exception):
    """The paper's statement defines no computable quantity."""


@dataclass(frozen=True)
class Obs:
    """One computed value (in the unit of the table entry) with its interval and sample size."""

    value: float | list | None
    ci: tuple[float, float] | None = None
    n: int | None = None
    label: str = ""
    spacing: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditRow:
    """One evaluated paper number."""

    id: str
    ref: int
    description: str
    paper_text: str
    paper_value: Any
    unit: str
    formula: str
    rule: str
    verdict: str
    reason: str = ""
    observations: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_paper_table(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The declarative table (default: the packaged ``esr/data/paper_numbers.yaml``)."""
    if path is None:
        text = resources.files("esr").joinpath("data/paper_numbers.yaml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return yaml.safe_load(text)


class CellIndex:
    """All summary cells of a run, searchable by experiment, model and condition pattern."""

    def __init__(self, cells: Sequence[Mapping[str, Any]]):
        self.cells = list(cells)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike]) -> "CellIndex":
        cells: list[Mapping[str, Any]] = []
        for p in paths:
            cells.extend(io.read_json(p).get("cells", []))
        return cls(cells)

    def find(self, experiment: str, model: str, condition: str = "*") -> list[Mapping[str, Any]]:
        return [c for c in self.cells if c.get("experiment") == experiment and c.get("model") == model
                and fnmatch.fnmatchcase(str(c.get("condition")), condition)]

    @property
    def experiments(self) -> list[str]:
        return sorted({str(c.get("experiment")) for c in self.cells})


@dataclass
class AuditContext:
    index: CellIndex
    config: Mapping[str, Any] | None
    model_map: Mapping[str, str]
    paper_models: list[str]
    base_dir: Path


def _get_path(obj: Any, path: str | Sequence[str]) -> Any:
    """Follow a dotted path (or a list of keys, for keys that contain dots such as model names)."""
    cur = obj
    for part in (path.split(".") if isinstance(path, str) else path):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(path)
    return cur


def _resolve_model(ctx: AuditContext, model: str) -> str:
    ours = ctx.model_map.get(model, model)
    if model in ("all",):
        return model
    if ctx.config is not None and ours not in ctx.config.get("models", {}):
        configured = ", ".join(sorted(ctx.config.get("models", {}))) or "none"
        raise NotRun(f"model {model} is not in this configuration (configured: {configured})")
    return ours


def _cells(ctx: AuditContext, src: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    model = _resolve_model(ctx, src["model"])
    cond = src.get("condition", "baseline")
    found = ctx.index.find(src["experiment"], model, cond)
    if not found:
        exps = ", ".join(ctx.index.experiments) or "none"
        raise NotRun(f"no summary for experiment={src['experiment']} model={model} condition={cond} "
                     f"(summaries cover experiments: {exps})")
    return found


def _scale(unit: str) -> float:
    return 100.0 if unit == "percent" else 1.0


def _rate_obs(cell: Mapping[str, Any], metric: str, unit: str) -> Obs:
    m = cell["metrics"][metric]
    s = _scale(unit)
    est = m.get("estimate")
    ci = m.get("wilson")
    return Obs(None if est is None else est * s, None if not ci or ci[0] is None else (ci[0] * s, ci[1] * s),
               m.get("n"), str(cell.get("condition")),
               details={"k": m.get("k"), "n": m.get("n"),
                        "wald": [None if v is None else v * s for v in m.get("wald", [None, None])],
                        "bootstrap": [None if v is None else v * s for v in (m.get("bootstrap") or [None, None])]})


def _mean_obs(cell: Mapping[str, Any], metric: str) -> Obs:
    m = cell["metrics"][metric]
    ci = m.get("ci")
    return Obs(m.get("mean"), None if not ci or ci[0] is None else (ci[0], ci[1]), m.get("n"),
               str(cell.get("condition")), details={"sd": m.get("sd"), "bootstrap": m.get("bootstrap")})


def _models_list(ctx: AuditContext, src: Mapping[str, Any]) -> list[str]:
    models = src.get("models", [])
    return list(ctx.paper_models) if models == "all_paper" else list(models)


def _pooled_cells(ctx: AuditContext, src: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for m in _models_list(ctx, src):
        out.extend(_cells(ctx, {**src, "model": m}))
    return out


def _f_rate(ctx, e, src):
    return [_rate_obs(c, src["metric"], e["unit"]) for c in _cells(ctx, src)]


def _f_pooled_rate(ctx, e, src):
    cells = _pooled_cells(ctx, src)
    k = sum(int(c["metrics"][src["metric"]]["k"]) for c in cells)
    n = sum(int(c["metrics"][src["metric"]]["n"]) for c in cells)
    p, ci, s = Proportion(k, n), wilson_interval(k, n), _scale(e["unit"])
    return [Obs(p.estimate * s if n else None, (ci.lo * s, ci.hi * s) if n else None, n, f"pooled over {len(cells)}",
                details={"k": k, "n": n, "cells": len(cells)})]


def _f_mean(ctx, e, src):
    return [_mean_obs(c, src["metric"]) for c in _cells(ctx, src)]


def _f_pooled_mean(ctx, e, src):
    def nan_if_none(x: Any) -> float:
        return math.nan if x is None else float(x)

    cells = _pooled_cells(ctx, src)
    ms = [c["metrics"][src["metric"]] for c in cells]
    pm = pooled_mean([MeanEstimate(int(m["n"]), nan_if_none(m["mean"]), nan_if_none(m["sd"])) for m in ms])
    ci = pm.normal()
    return [Obs(pm.mean, (ci.lo, ci.hi), pm.n, f"pooled over {len(cells)}")]


def _f_count(ctx, e, src):
    out = []
    for c in _cells(ctx, src):
        try:
            v = _get_path(c, src["field"])
        except KeyError:
            raise NotRun(f"summary cell {c.get('experiment')}/{c.get('condition')} has no field {src['field']}")
        if v is None:
            raise NotRun(f"summary cell {c.get('experiment')}/{c.get('condition')} has no value for {src['field']}")
        out.append(Obs(v, None, c.get("n"), str(c.get("condition"))))
    return out


def _f_pooled_count(ctx, e, src):
    cells = _pooled_cells(ctx, src)
    return [Obs(sum(int(_get_path(c, src["field"])) for c in cells), None, None, f"pooled over {len(cells)}")]


def _f_n_cells(ctx, e, src):
    cells = _cells(ctx, src)
    return [Obs(len(cells), None, None, src.get("condition", ""))]


def _f_mean_n_per_cell(ctx, e, src):
    cells = _cells(ctx, src)
    return [Obs(float(np.mean([c["n"] for c in cells])), None, int(sum(c["n"] for c in cells)),
                f"{len(cells)} cells")]


def _ratio_parts(ctx, a: Mapping[str, Any], b: Mapping[str, Any]):
    ca, cb = _cells(ctx, a), _cells(ctx, b)
    if len(ca) != 1 or len(cb) != 1:
        raise NotRun(f"ratio needs one cell each; found {len(ca)} and {len(cb)}")
    ma, mb = ca[0]["metrics"][a["metric"]], cb[0]["metrics"][b["metric"]]
    return int(ma["k"]), int(ma["n"]), int(mb["k"]), int(mb["n"])


def _f_ratio(ctx, e, src):
    kb, nb, ko, no = _ratio_parts(ctx, src["denominator"], src["numerator"])
    rc = relative_change(kb, nb, ko, no)
    ci = None if math.isnan(rc.ratio_ci.lo) else (rc.ratio_ci.lo, rc.ratio_ci.hi)
    return [Obs(None if math.isnan(rc.ratio) else rc.ratio, ci, no, "", details=rc.to_dict())]


def _f_rel_change(ctx, e, src):
    kb, nb, ko, no = _ratio_parts(ctx, src["base"], src["other"])
    rc = relative_change(kb, nb, ko, no)
    s = _scale(e["unit"])
    ci = None if math.isnan(rc.ratio_ci.lo) else ((rc.ratio_ci.lo - 1) * s, (rc.ratio_ci.hi - 1) * s)
    return [Obs(None if math.isnan(rc.ratio) else rc.relative_change * s, ci, no, "", details=rc.to_dict())]


def _f_sweep_peak(ctx, e, src):
    from scipy.ndimage import gaussian_filter1d

    cells = [c for c in _cells(ctx, {**src, "condition": src.get("condition", "level=*")})
             if (c.get("extra") or {}).get("boost_sigma") is not None]
    cells.sort(key=lambda c: c["extra"]["boost_sigma"])
    if len(cells) < 2:
        raise NotRun("fewer than two boost levels in σ units summarised (global levels, or sweep_stats)")
    x = np.asarray([c["extra"]["boost_sigma"] for c in cells], dtype=float)
    ms = [c["metrics"][src["metric"]] for c in cells]
    est = np.array([m["estimate"] if m["estimate"] is not None else 0.0 for m in ms], dtype=float)
    lo = np.array([m["wilson"][0] if m["wilson"][0] is not None else 0.0 for m in ms], dtype=float)
    hi = np.array([m["wilson"][1] if m["wilson"][1] is not None else 1.0 for m in ms], dtype=float)
    sig = float(src.get("smooth_sigma", 0) or 0)
    if sig > 0:
        est, lo, hi = (gaussian_filter1d(a, sig) for a in (est, lo, hi))
    i = int(np.argmax(est))
    spacing = float(np.median(np.diff(x)))
    s = _scale(e["unit"])
    if src.get("part") == "location":
        return [Obs(float(x[i]), None, ms[i]["n"], f"level {i}", spacing=spacing,
                    details={"boost": cells[i]["extra"]["boost"]})]
    return [Obs(float(est[i] * s), (float(lo[i] * s), float(hi[i] * s)), ms[i]["n"], f"boost_sigma={x[i]:.3g}",
                details={"smoothed": sig > 0})]


def _f_judge_agreement(ctx, e, src):
    cells = ctx.index.find(src["experiment"], "all", "all")
    pairs = [p for c in cells for p in c.get("judge_pairs", [])]
    if not pairs:
        raise NotRun(f"no judge-pair summary for experiment={src['experiment']}")
    s = _scale(e["unit"])
    out = []
    for p in pairs:
        m = p[src["metric"]]
        if not m["n"]:
            continue
        out.append(Obs(m["estimate"] * s, (m["wilson"][0] * s, m["wilson"][1] * s), m["n"],
                       f"{p['judge_a']} vs {p['judge_b']}"))
    if not out:
        raise NotRun("no judge pair has trials to compare")
    return out


def _f_value(ctx, e, src):
    out = []
    for c in _cells(ctx, src):
        vals = c.get("values", {})
        if src["key"] not in vals:
            raise NotRun(f"summary {c.get('experiment')}/{c.get('model')} has no value {src['key']!r}")
        v = vals[src["key"]]
        if isinstance(v, Mapping):
            ci = v.get("ci")
            out.append(Obs(v.get("estimate"), tuple(ci) if ci and ci[0] is not None else None, v.get("n"),
                           str(c.get("condition"))))
        else:
            out.append(Obs(v, None, None, str(c.get("condition"))))
    return out


def _f_config(ctx, e, src):
    if ctx.config is None:
        raise NotRun("no config given to the audit")
    parts = src["path"].split(".")
    if "{model}" in parts:
        model = _resolve_model(ctx, src["model"])
        parts = [model if p == "{model}" else p for p in parts]
    path = ".".join(parts)
    try:
        v = _get_path(ctx.config, parts)
    except KeyError:
        raise NotRun(f"config has no key {path!r}")
    if src.get("len"):
        v = len(v)
    if src.get("scale") is not None and isinstance(v, (int, float)):
        v = v * src["scale"]
    return [Obs(v, None, None, path)]


def _f_prompts_file(ctx, e, src):
    if ctx.config is None:
        raise NotRun("no config given to the audit")
    try:
        p = Path(_get_path(ctx.config, "prompts.path"))
    except KeyError:
        raise NotRun("config has no key 'prompts.path'")
    p = p if p.is_absolute() else ctx.base_dir / p
    if not p.exists():
        raise NotRun(f"prompts file {p} not present")
    n = sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    return [Obs(n, None, None, str(p.name))]


def _f_constant(ctx, e, src):
    return [Obs(src["value"], None, None, "package constant")]


def _f_not_testable(ctx, e, src):
    raise NotTestable(src.get("reason", "no computable quantity"))


FORMULAS = {
    "rate": _f_rate, "pooled_rate": _f_pooled_rate, "mean": _f_mean, "pooled_mean": _f_pooled_mean,
    "count": _f_count, "pooled_count": _f_pooled_count, "n_cells": _f_n_cells, "mean_n_per_cell": _f_mean_n_per_cell,
    "ratio": _f_ratio, "rel_change": _f_rel_change, "sweep_peak": _f_sweep_peak,
    "judge_agreement": _f_judge_agreement, "value": _f_value, "config": _f_config, "prompts_file": _f_prompts_file,
    "constant": _f_constant, "not_testable": _f_not_testable,
}


# ----------------------------------------------------------------------------------------------- tolerance rules


def printed_decimals(value: Any) -> int:
    """Decimals as printed: 3.8 → 1, 0.0119 → 4, 26 → 0."""
    if isinstance(value, bool) or not isinstance(value, float):
        return 0
    s = repr(value)
    if "e" in s or "E" in s:
        return max(0, -int(math.floor(math.log10(abs(value))))) if value else 0
    return len(s.split(".")[1].rstrip("0")) if "." in s else 0


def paper_interval(value: float, decimals: int | None = None) -> tuple[float, float]:
    """Values that round to the printed paper value (value ± half a unit of the last printed digit)."""
    d = printed_decimals(value) if decimals is None else decimals
    h = 0.5 * 10 ** (-d)
    return value - h, value + h


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def check(obs: Obs, paper_value: Any, tol: Mapping[str, Any], decimals: int | None = None) -> bool:
    """Apply one tolerance rule (see ``CONSISTENCY_DEFINITION``) to one observation."""
    rule = tol["rule"]
    v, ci = obs.value, obs.ci
    if v is None and ci is None:
        return False
    if rule == "exact":
        return _close(v, paper_value)
    if rule == "rel_tol":
        return abs(float(v) - paper_value) <= tol["tol"] * abs(paper_value)
    if rule == "abs_tol":
        return abs(float(v) - paper_value) <= tol["tol"]
    if rule == "level_spacing":
        return obs.spacing is not None and abs(float(v) - paper_value) <= obs.spacing + 1e-9
    if rule == "ci":
        p = paper_interval(float(paper_value), decimals)
        return _overlaps(p, ci) if ci is not None else p[0] <= float(v) <= p[1]
    if rule == "upper_bound":
        x = ci[0] if ci is not None else float(v)
        return x <= paper_value if tol.get("inclusive") else x < paper_value
    if rule == "lower_bound":
        x = ci[1] if ci is not None else float(v)
        return x >= paper_value if tol.get("inclusive") else x > paper_value
    if rule == "range":
        r = (float(paper_value[0]), float(paper_value[1]))
        return _overlaps(r, ci) if ci is not None else r[0] <= float(v) <= r[1]
    raise ValueError(f"unknown tolerance rule {rule!r}")


def _rule_text(tol: Mapping[str, Any] | None) -> str:
    if not tol:
        return ""
    rule = tol["rule"]
    if rule in ("rel_tol", "abs_tol"):
        return f"{rule} {tol['tol']}"
    if rule in ("upper_bound", "lower_bound"):
        return f"{rule}{' (inclusive)' if tol.get('inclusive') else ''}"
    return rule


def evaluate_entry(entry: Mapping[str, Any], ctx: AuditContext) -> AuditRow:
    """Compute our value(s) for one table entry and its verdict."""
    src = entry.get("source", {}) or {}
    tol = entry.get("tolerance")
    notes = entry.get("notes", "") or ""
    row = AuditRow(id=str(entry["id"]), ref=int(entry["ref"]), description=entry["description"],
                   paper_text=str(entry.get("paper_text", "")), paper_value=entry.get("paper_value"),
                   unit=entry.get("unit", ""), formula=entry["formula"], rule=_rule_text(tol), verdict=NOT_RUN,
                   notes=notes)
    mapped = ctx.model_map.get(src.get("model", ""))
    if mapped:
        row.notes = (notes + " " if notes else "") + f"Compared against stand-in model {mapped}."
    try:
        obs = FORMULAS[entry["formula"]](ctx, entry, src)
    except NotRun as exc:
        row.verdict, row.reason = NOT_RUN, str(exc)
        return row
    except NotTestable as exc:
        row.verdict, row.reason = NOT_TESTABLE, str(exc)
        return row
    row.observations = [{"label": o.label, "value": o.value, "ci": list(o.ci) if o.ci else None, "n": o.n,
                         **({"spacing": o.spacing} if o.spacing is not None else {}), **o.details} for o in obs]
    ok = all(check(o, entry.get("paper_value"), tol, entry.get("decimals")) for o in obs)
    if any(o.value is None and o.ci is None for o in obs):
        row.reason = "no estimate (no included trials in the denominator)"
    if not ok and entry.get("on_mismatch") == "not_run":
        row.verdict = NOT_RUN
        row.reason = f"this configuration uses {_fmt_values(obs)} (paper design: {row.paper_text})"
    else:
        row.verdict = CONSISTENT if ok else INCONSISTENT
    return row


def _fmt_num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if v != 0 and abs(v) < 0.01:
            return f"{v:.4g}"
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return "–".join(_fmt_num(x) for x in v)
    return str(v)


def _fmt_values(obs: Sequence[Obs]) -> str:
    return "; ".join(_fmt_num(o.value) for o in obs)


def render_markdown(rows: Sequence[AuditRow], header: Mapping[str, Any]) -> str:
    """The human-readable audit table."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    run = header.get("run_name") or ""
    lines = [f"# Paper numbers audit{f' ({run})' if run else ''}", "",
             f"Paper: {header.get('paper', '')}. Table: `{header.get('table', '')}`; every row of reference-protocol "
             "§8. Rates in percent; intervals are 95 %.", "", CONSISTENCY_DEFINITION,
             "**Summary:** " + ", ".join(f"{verdict}: {count}" for verdict, count in sorted(counts.items())), "",
             "| id | number | paper | ours | 95% CI | n | rule | verdict | reason / notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        obs = r.observations
        ours = "; ".join(_fmt_num(o["value"]) + (f" ({o['label']})" if len(obs) > 1 and o["label"] else "")
                         for o in obs) or "—"
        ci = "; ".join(f"[{_fmt_num(o['ci'][0])}, {_fmt_num(o['ci'][1])}]" if o.get("ci") else "—"
                       for o in obs) or "—"
        n = "; ".join(_fmt_num(o.get("n")) for o in obs) or "—"
        note = " ".join(x for x in (r.reason, r.notes) if x).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.id} | {r.description} | {r.paper_text} | {ours} | {ci} | {n} | {r.rule} | "
                     f"**{r.verdict}** | {note} |")
    return "\n".join(lines) + "\n"


def audit(index: CellIndex, config: Mapping[str, Any] | None, table: Mapping[str, Any] | None = None,
          model_map: Mapping[str, str] | None = None, base_dir: str | os.PathLike = ".") -> list[AuditRow]:
    """Evaluate every entry of the table against a run's summary cells."""
    table = table or load_paper_table()
    ctx = AuditContext(index, config, dict(model_map or {}), list((table.get("models") or {}).values()),
                       Path(base_dir))
    return [evaluate_entry(e, ctx) for e in table["numbers"]]


def build_audit(summary_jsons: Sequence[str | os.PathLike], out_json: str | os.PathLike,
                out_md: str | os.PathLike, config: Mapping[str, Any] | None, *,
                table_path: str | os.PathLike | None = None, model_map: Mapping[str, str] | None = None,
                base_dir: str | os.PathLike = ".") -> list[AuditRow]:
    """Snakemake ``audit`` entry: write ``paper_numbers.json`` and ``paper_numbers.md``.

    ``model_map`` (paper model key → configured model key) lets a stand-in model (e.g. the embedded default)
    be compared with a paper model's numbers; rows compared that way say so in their notes."""
    from esr.provenance import provenance

    table = load_paper_table(table_path)
    rows = audit(CellIndex.from_files(summary_jsons), config, table, model_map, base_dir)
    header = {"run_name": (config or {}).get("run_name", ""),
              "paper": "McKenzie et al., arXiv 2602.06941 v1",
              "table": str(table_path) if table_path else "esr/data/paper_numbers.yaml"}
    verdicts: dict[str, int] = {}
    for r in rows:
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    out = {"schema": AUDIT_SCHEMA, **header, "definition": CONSISTENCY_DEFINITION, "verdict_counts": verdicts,
           "model_map": dict(model_map or {}), "inputs": [str(p) for p in summary_jsons],
           "provenance": provenance(dict(config) if config is not None else None),
           "numbers": [r.to_dict() for r in rows]}
    io.write_json(out_json, out)
    io.write_text(out_md, render_markdown(rows, header))
    return rows

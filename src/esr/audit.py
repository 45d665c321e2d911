"""The audit of the paper's numbers: every number printed in the paper (arXiv 2602.06941 v1: its methods and results,
Sec. 2–3, and its appendix) against the summary cells of a run, with a verdict each.

The numbers are declared in ``esr/data/paper_numbers.yaml``: each entry names a *formula* (``FORMULAS``: a rate,
pooled rate, mean, count, ratio, relative change, sweep peak, judge agreement, summary value or config value), the
summary cells it reads (a ``source`` selecting experiment, model and ``cell`` label pattern, see
``esr.summaries``) and a *tolerance rule*. :func:`audit` evaluates every entry over the cells of a run
(:class:`CellIndex`) into :class:`AuditRow` s; :func:`check` applies the rules of ``CONSISTENCY_DEFINITION``.
:func:`build_audit` (the Snakemake ``audit`` rule) writes the rows as ``paper_numbers.json`` (schema
``esr.paper_numbers/1``), as a Markdown table for text readers and as an HTML page (Jinja2 template
``esr/templates/audit.html.j2``).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml
from scipy.ndimage import gaussian_filter1d

from esr import io
from esr.metrics import (
    METRIC_BOUNDS,
    MeanEstimate,
    Proportion,
    pooled_mean,
    wilson_fraction_interval,
    wilson_interval,
)
from esr.provenance import provenance
from esr.stats import relative_change

AUDIT_SCHEMA = "esr.paper_numbers/1"
PAPER = "McKenzie et al., arXiv 2602.06941 v1"
DEFAULT_TABLE = "esr/data/paper_numbers.yaml"
SUMMARY_SCHEMA = "esr.summary/1"

CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
INCONCLUSIVE = "inconclusive (underpowered)"
NOT_RUN = "not run in this configuration"
NOT_IMPLEMENTED = "not implemented in this package"
NOT_TESTABLE = "not testable"
VERDICTS = (CONSISTENT, INCONSISTENT, INCONCLUSIVE, NOT_RUN, NOT_IMPLEMENTED, NOT_TESTABLE)

#: Why a row is "not run": the input is absent (model, experiment, cell, config key), the configuration's design
#: differs from the paper's (``on_mismatch: not_run``), or the selected summary cell exists but lacks the field the
#: row reads (a key the code does not write: a defect, listed by ``not_run_rows_with_inputs``).
MISSING_INPUT, DESIGN_DIFFERS, MISSING_FIELD = "missing_input", "design_differs", "missing_field"

# ----------------------------------------------------------------------------------------------- verdict definition
# Rich text as runs of (style, text), style "" (plain), "b", "i" or "code": rendered to Markdown and to HTML alike.

Runs = tuple[tuple[str, str], ...]


def _runs(*parts: str | tuple[str, str]) -> Runs:
    return tuple(p if isinstance(p, tuple) else ("", p) for p in parts)


def _b(text: str) -> tuple[str, str]:
    return "b", text


def _i(text: str) -> tuple[str, str]:
    return "i", text


def _code(text: str) -> tuple[str, str]:
    return "code", text


DEFINITION_INTRO: Runs = _runs(
    _b("Verdicts."),
    " Each paper number is compared with our estimate and its 95 % interval. A verdict must be able to fail: where"
    " our interval cannot tell the paper's claim from no effect, the row is ",
    _b(INCONCLUSIVE),
    ", with the sample size that would decide it.",
)
#: (item, sub-items) of the verdict definition.
DEFINITION_ITEMS: tuple[tuple[Runs, tuple[Runs, ...]], ...] = (
    (
        _runs(
            _i("Printed precision."),
            " A printed value stands for the interval of values that round to it (3.8 % "
            "means [3.75, 3.85] %; 0 % means [0, 0.5] %).",
        ),
        (),
    ),
    (
        _runs(_b(CONSISTENT), " when the claim is compatible with our 95 % interval:"),
        (
            _runs(
                "rates (",
                _code("ci"),
                " rule): the printed-precision interval of the paper value overlaps our ",
                _b("Wilson"),
                " 95 % interval;",
            ),
            _runs(
                "means (",
                _code("ci"),
                " rule): it overlaps our interval for the mean; for bounded scores (0–100) a logit-transformed "
                "interval that stays inside the scale (the paper's mean ± 1.96·SE is kept in the JSON as ",
                _code("wald_paper"),
                ");",
            ),
            _runs(
                "values the summary gives without an interval (exp9 region means, Cohen's d extremes): our value ± "
                "the tolerance stated in the table is the interval;"
            ),
            _runs(
                "ratios and relative changes (",
                _code("ci"),
                " rule): it overlaps the Katz log-ratio 95 % interval "
                "computed from our unrounded counts (independent-samples formula, conservative for paired replays);",
            ),
            _runs(
                "and, when the paper's value differs from the no-effect value (0 for a rate, a change or a "
                "difference, 1 for a ratio), our interval excludes the no-effect value; when the paper's value is "
                'itself no effect ("0 %"), our interval lies within its printed precision;'
            ),
            _runs('bounds ("< 1 %", "> 95 %"): our whole interval lies on the claimed side of the bound;'),
            _runs('ranges ("88–92", "93–97 %"): our whole interval lies inside the range;'),
            _runs(
                "constants and design values (",
                _code("exact"),
                "): equal; design counts (",
                _code("rel_tol"),
                "): within the stated relative tolerance;",
            ),
            _runs(
                "peak locations (",
                _code("level_spacing"),
                "): within one boost-level spacing of the paper's location, on a curve whose peak stands out (its "
                "lower bound above the lowest level's estimate and above 0; otherwise inconclusive);",
            ),
            _runs("claims over several cells (every judge pair, every random set) must hold for each of them."),
        ),
    ),
    (
        _runs(
            _b(INCONSISTENT),
            " when our interval excludes every value the claim allows (no overlap with the printed-precision "
            "interval or the range; wholly on the wrong side of a bound), or a design value differs.",
        ),
        (),
    ),
    (
        _runs(
            _b(INCONCLUSIVE),
            " otherwise: our interval holds both values the claim allows and a value it excludes (the no-effect value,"
            " or the far side of a bound or range). The row gives ",
            _code("n_to_decide"),
            ": for rates, the smallest n at which a Wilson interval around the paper's value would exclude the "
            "no-effect value and one around the no-effect value would exclude the paper's value (for bounds and "
            "ranges: one around our estimate would clear the bound); for other estimates, our n scaled by "
            "(half-width / distance)². Counts, design values and constants have no sampling error and are never "
            "inconclusive; rows whose quantity has no no-effect value (mean scores) keep the overlap rule.",
        ),
        (),
    ),
    (
        _runs(
            _b(NOT_RUN),
            ": the run that would produce the number (model, experiment, summary cell or config key) is "
            "not part of this configuration; the reason is given.",
        ),
        (),
    ),
    (
        _runs(
            _b(NOT_IMPLEMENTED),
            ": the experiment that produces the number (exp4 fine-tuning, the Figure 1 example) is not implemented "
            "in this package, so no configuration can run it (reason given).",
        ),
        (),
    ),
    (_runs(_b(NOT_TESTABLE), ": the paper's statement defines no quantity that can be computed (reason given)."), ()),
)

_MARKDOWN_STYLE = {"": "{}", "b": "**{}**", "i": "*{}*", "code": "`{}`"}


def _markdown_runs(runs: Runs) -> str:
    return "".join(_MARKDOWN_STYLE[style].format(text) for style, text in runs)


def _definition_markdown() -> str:
    lines = [_markdown_runs(DEFINITION_INTRO), ""]
    for item, subs in DEFINITION_ITEMS:
        lines.append("* " + _markdown_runs(item))
        lines += ["  - " + _markdown_runs(s) for s in subs]
    return "\n".join(lines) + "\n"


#: The verdict rules in Markdown (also stored in ``paper_numbers.json``).
CONSISTENCY_DEFINITION = _definition_markdown()


# ----------------------------------------------------------------------------------------------- engine


class NotRun(Exception):
    """The number needs a run (model, experiment, summary cell, config key) this configuration did not do."""


class MissingField(NotRun):
    """The selected summary cell exists but lacks the field, metric or value the row reads."""


class NotTestable(Exception):
    """The paper's statement defines no computable quantity."""


class NotImplementedHere(Exception):
    """The experiment producing the number is not implemented in this package."""


@dataclass(frozen=True)
class Obs:
    """One computed value (in the unit of the table entry) with its interval and sample size.

    ``proportion_scale``: set (100 for percent, 1 for a fraction) when the value is a proportion k/n with a Wilson
    interval, so the audit can give the n that would decide an inconclusive row. ``undecided``: a reason, set by the
    formula, why this value cannot decide the claim (e.g. a peak location on a curve with no significant peak)."""

    value: float | list | None
    ci: tuple[float, float] | None = None
    n: int | None = None
    label: str = ""
    spacing: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    proportion_scale: float | None = None
    undecided: str | None = None


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
    n_to_decide: int | None = None
    not_run_cause: str = ""

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
    """All summary cells of a run, searchable by experiment, model and cell-label pattern (``fnmatch``)."""

    def __init__(self, cells: Sequence[Mapping[str, Any]]):
        self.cells = list(cells)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike]) -> CellIndex:
        cells: list[Mapping[str, Any]] = []
        for p in paths:
            cells.extend(io.read_json(p).get("cells", []))
        return cls(cells)

    def find(self, experiment: str, model: str, cell: str | Sequence[str] = "*") -> list[Mapping[str, Any]]:
        """Cells of ``experiment`` and ``model`` whose label matches ``cell`` (an ``fnmatch`` pattern), or, for a list
        of patterns, the matches of the first pattern that matches any cell (a specific pattern, then fallbacks)."""
        for pattern in [cell] if isinstance(cell, str) else cell:
            found = [
                c
                for c in self.cells
                if c.get("experiment") == experiment
                and c.get("model") == model
                and fnmatch.fnmatchcase(str(c.get("cell")), pattern)
            ]
            if found:
                return found
        return []

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
    for part in path.split(".") if isinstance(path, str) else path:
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
    cell = src.get("cell", "baseline")
    found = ctx.index.find(src["experiment"], model, cell)
    if not found:
        exps = ", ".join(ctx.index.experiments) or "none"
        raise NotRun(
            f"no summary for experiment={src['experiment']} model={model} cell={cell} "
            f"(summaries cover experiments: {exps})"
        )
    return found


def _scale(unit: str) -> float:
    return 100.0 if unit == "percent" else 1.0


def _metric(c: Mapping[str, Any], metric: str) -> Mapping[str, Any]:
    try:
        return c["metrics"][metric]
    except (KeyError, TypeError):
        raise MissingField(
            f"summary cell {c.get('experiment')}/{c.get('model')}/{c.get('cell')} has no metric {metric!r}"
        ) from None


def _field(c: Mapping[str, Any], path: str) -> Any:
    try:
        v = _get_path(c, path)
    except KeyError:
        raise MissingField(f"summary cell {c.get('experiment')}/{c.get('cell')} has no field {path}") from None
    if v is None:
        raise MissingField(f"summary cell {c.get('experiment')}/{c.get('cell')} has no value for {path}")
    return v


def _rate_obs(c: Mapping[str, Any], metric: str, unit: str) -> Obs:
    m = _metric(c, metric)
    s = _scale(unit)
    est = m.get("estimate")
    ci = m.get("wilson")
    return Obs(
        None if est is None else est * s,
        None if not ci or ci[0] is None else (ci[0] * s, ci[1] * s),
        m.get("n"),
        str(c.get("cell")),
        details={
            "k": m.get("k"),
            "n": m.get("n"),
            "wald": [None if v is None else v * s for v in m.get("wald", [None, None])],
            "bootstrap": [None if v is None else v * s for v in (m.get("bootstrap") or [None, None])],
        },
        proportion_scale=s,
    )


def _mean_obs(c: Mapping[str, Any], metric: str) -> Obs:
    m = _metric(c, metric)
    ci = m.get("ci")
    return Obs(
        m.get("mean"),
        None if not ci or ci[0] is None else (ci[0], ci[1]),
        m.get("n"),
        str(c.get("cell")),
        details={
            "sd": m.get("sd"),
            "ci_method": m.get("ci_method", "normal"),
            "wald_paper": m.get("wald_paper"),
            "bootstrap": m.get("bootstrap"),
        },
    )


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
    k = sum(int(_metric(c, src["metric"])["k"]) for c in cells)
    n = sum(int(_metric(c, src["metric"])["n"]) for c in cells)
    p, ci, s = Proportion(k, n), wilson_interval(k, n), _scale(e["unit"])
    return [
        Obs(
            p.estimate * s if n else None,
            (ci.lo * s, ci.hi * s) if n else None,
            n,
            f"pooled over {len(cells)}",
            details={"k": k, "n": n, "cells": len(cells)},
            proportion_scale=s,
        )
    ]


def _f_mean(ctx, e, src):
    return [_mean_obs(c, src["metric"]) for c in _cells(ctx, src)]


def _f_pooled_mean(ctx, e, src):
    def nan_if_none(x: Any) -> float:
        return math.nan if x is None else float(x)

    cells = _pooled_cells(ctx, src)
    ms = [_metric(c, src["metric"]) for c in cells]
    bounds = METRIC_BOUNDS.get(src["metric"])
    pm = pooled_mean([MeanEstimate(int(m["n"]), nan_if_none(m["mean"]), nan_if_none(m["sd"]), bounds) for m in ms])
    ci, wald = pm.interval(), pm.normal()
    return [
        Obs(
            None if math.isnan(pm.mean) else pm.mean,
            None if ci.is_nan else (ci.lo, ci.hi),
            pm.n,
            f"pooled over {len(cells)}",
            details={"ci_method": ci.method, "wald_paper": wald.as_list()},
        )
    ]


def _f_count(ctx, e, src):
    return [Obs(_field(c, src["field"]), None, c.get("n"), str(c.get("cell"))) for c in _cells(ctx, src)]


def _f_pooled_count(ctx, e, src):
    cells = _pooled_cells(ctx, src)
    return [Obs(sum(int(_field(c, src["field"])) for c in cells), None, None, f"pooled over {len(cells)}")]


def _f_n_cells(ctx, e, src):
    cells = _cells(ctx, src)
    return [Obs(len(cells), None, None, src.get("cell", ""))]


def _f_mean_n_per_cell(ctx, e, src):
    cells = _cells(ctx, src)
    return [Obs(float(np.mean([c["n"] for c in cells])), None, int(sum(c["n"] for c in cells)), f"{len(cells)} cells")]


def _ratio_parts(ctx, a: Mapping[str, Any], b: Mapping[str, Any]):
    ca, cb = _cells(ctx, a), _cells(ctx, b)
    if len(ca) != 1 or len(cb) != 1:
        raise NotRun(f"ratio needs one cell each; found {len(ca)} and {len(cb)}")
    ma, mb = _metric(ca[0], a["metric"]), _metric(cb[0], b["metric"])
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
    cells = [
        c
        for c in _cells(ctx, {**src, "cell": src.get("cell", "level=*")})
        if (c.get("extra") or {}).get("boost_sigma") is not None
    ]
    cells.sort(key=lambda c: c["extra"]["boost_sigma"])
    if len(cells) < 2:
        raise NotRun("fewer than two boost levels in σ units summarised (global levels)")
    x = np.asarray([c["extra"]["boost_sigma"] for c in cells], dtype=float)
    ms = [_metric(c, src["metric"]) for c in cells]
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
        # A peak location is only a finding when the peak stands out: its (smoothed) lower bound above the lowest
        # level's estimate and above 0.
        flat = lo[i] <= 0.0 or lo[i] <= float(np.min(est))
        return [
            Obs(
                float(x[i]),
                None,
                ms[i]["n"],
                f"level {i}",
                spacing=spacing,
                details={"boost": cells[i]["extra"]["boost"], "peak_lower": float(lo[i] * s)},
                undecided=(
                    f"the curve has no significant peak (lower bound at the peak {lo[i] * s:.3g} does not exceed "
                    f"the lowest level's estimate {float(np.min(est)) * s:.3g} or 0)"
                    if flat
                    else None
                ),
            )
        ]
    return [
        Obs(
            float(est[i] * s),
            (float(lo[i] * s), float(hi[i] * s)),
            ms[i]["n"],
            f"boost_sigma={x[i]:.3g}",
            details={"smoothed": sig > 0},
            proportion_scale=None if sig > 0 else s,
        )
    ]


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
        out.append(
            Obs(
                m["estimate"] * s,
                (m["wilson"][0] * s, m["wilson"][1] * s),
                m["n"],
                f"{p['judge_a']} vs {p['judge_b']}",
                proportion_scale=s,
            )
        )
    if not out:
        raise NotRun("no judge pair has trials to compare")
    return out


def _f_value(ctx, e, src):
    out = []
    for c in _cells(ctx, src):
        vals = c.get("values") or {}
        if src["key"] not in vals:
            raise MissingField(f"summary {c.get('experiment')}/{c.get('model')} has no value {src['key']!r}")
        v = vals[src["key"]]
        if isinstance(v, Mapping):
            ci = v.get("ci")
            out.append(
                Obs(v.get("estimate"), tuple(ci) if ci and ci[0] is not None else None, v.get("n"), str(c.get("cell")))
            )
        else:
            out.append(Obs(v, None, None, str(c.get("cell"))))
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
        raise NotRun(f"config has no key {path!r}") from None
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
        raise NotRun("config has no key 'prompts.path'") from None
    p = p if p.is_absolute() else ctx.base_dir / p
    if not p.exists():
        raise NotRun(f"prompts file {p} not present")
    n = sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    return [Obs(n, None, None, str(p.name))]


def _f_constant(ctx, e, src):
    return [Obs(src["value"], None, None, "package constant")]


def _f_not_testable(ctx, e, src):
    raise NotTestable(src.get("reason", "no computable quantity"))


def _f_not_implemented(ctx, e, src):
    raise NotImplementedHere(src.get("reason", "the experiment producing this number is not implemented"))


FORMULAS = {
    "rate": _f_rate,
    "pooled_rate": _f_pooled_rate,
    "mean": _f_mean,
    "pooled_mean": _f_pooled_mean,
    "count": _f_count,
    "pooled_count": _f_pooled_count,
    "n_cells": _f_n_cells,
    "mean_n_per_cell": _f_mean_n_per_cell,
    "ratio": _f_ratio,
    "rel_change": _f_rel_change,
    "sweep_peak": _f_sweep_peak,
    "judge_agreement": _f_judge_agreement,
    "value": _f_value,
    "config": _f_config,
    "prompts_file": _f_prompts_file,
    "constant": _f_constant,
    "not_testable": _f_not_testable,
    "not_implemented": _f_not_implemented,
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


@dataclass(frozen=True)
class Judgement:
    """The verdict of one observation under one rule; ``n_to_decide`` for an inconclusive one (None when no n
    decides it, e.g. our estimate sits on the bound)."""

    verdict: str
    reason: str = ""
    n_to_decide: int | None = None


#: Largest n the "n that would decide" search considers.
_N_MAX = 10**9


def null_value(entry: Mapping[str, Any]) -> float | None:
    """The no-effect value of a table entry, in its unit: the entry's ``null_value`` when given (null: none), else
    0 for rates (rate, pooled_rate, judge_agreement, a sweep-peak value), 1 for a ratio, 0 for a relative change;
    None (no no-effect value) for everything else (mean scores, counts, design values)."""
    if "null_value" in entry:
        return None if entry["null_value"] is None else float(entry["null_value"])
    formula = entry.get("formula")
    if formula in ("rate", "pooled_rate", "judge_agreement", "rel_change"):
        return 0.0
    if formula == "sweep_peak" and (entry.get("source") or {}).get("part") != "location":
        return 0.0
    if formula == "ratio":
        return 1.0
    return None


def _transform(entry: Mapping[str, Any]):
    """The scale on which an estimate's interval is roughly symmetric (log for ratios), for ``n_to_decide``."""
    if entry.get("formula") == "ratio":
        return lambda x: math.log(x) if x > 0 else -math.inf
    if entry.get("formula") == "rel_change":
        s = _scale(entry.get("unit", ""))
        return lambda x: math.log(1.0 + x / s) if 1.0 + x / s > 0 else -math.inf
    return lambda x: x


def _wilson_excludes(p: float, n: float, target: float) -> bool:
    w = wilson_fraction_interval(p, n)
    return target < w.lo or target > w.hi


def n_to_separate(
    obs: Obs, centre: float, target: float, interval: tuple[float, float] | None = None, transform=lambda x: x
) -> int | None:
    """The smallest sample size at which an interval centred on ``centre`` would exclude ``target`` (same unit).

    Proportions (``obs.proportion_scale`` set): the Wilson interval of the fraction centre/scale, searched over n
    (doubling, then bisection; None beyond 10⁹). Other estimates: our n scaled by (half-width / distance)² on the
    ``transform`` scale, from our ``interval`` at our n. None when centre equals target or nothing is known."""
    if obs.proportion_scale:
        p, t = centre / obs.proportion_scale, target / obs.proportion_scale
        if not 0.0 <= p <= 1.0 or p == t:
            return None
        hi = 1
        while not _wilson_excludes(p, hi, t):
            hi *= 2
            if hi > _N_MAX:
                return None
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _wilson_excludes(p, mid, t) else (mid, hi)
        return hi
    if interval is None or not obs.n:
        return None
    a, b, c, t = (transform(float(x)) for x in (interval[0], interval[1], centre, target))
    half, dist = (b - a) / 2.0, abs(c - t)
    if not (math.isfinite(half) and math.isfinite(dist)) or dist == 0 or half <= 0:
        return None
    return max(1, math.ceil(obs.n * (half / dist) ** 2))


def _interval_of(obs: Obs, tol: Mapping[str, Any]) -> tuple[float, float] | None:
    """Our interval: the observation's, else (for values the summary gives without one) value ± the entry's stated
    tolerance ``tol_abs`` / ``tol_rel`` (the larger), else None."""
    if obs.ci is not None:
        return (float(obs.ci[0]), float(obs.ci[1]))
    if isinstance(obs.value, (int, float)) and ("tol_abs" in tol or "tol_rel" in tol):
        h = max(float(tol.get("tol_abs", 0.0)), float(tol.get("tol_rel", 0.0)) * abs(float(obs.value)))
        return (float(obs.value) - h, float(obs.value) + h)
    return None


def _fmt_iv(iv: tuple[float, float]) -> str:
    return f"[{_fmt_num(iv[0])}, {_fmt_num(iv[1])}]"


def judge(
    obs: Obs,
    paper_value: Any,
    tol: Mapping[str, Any],
    *,
    decimals: int | None = None,
    null: float | None = None,
    transform=lambda x: x,
) -> Judgement:
    """The verdict of one observation (``CONSISTENCY_DEFINITION``): consistent, inconsistent or inconclusive
    (underpowered), with the n that would decide an inconclusive one. ``null``: the no-effect value (``null_value``);
    ``transform``: the scale for scaling n (``_transform``). Raises ValueError for an unknown rule."""
    rule = tol["rule"]
    v = obs.value
    if v is None and obs.ci is None:
        return Judgement(INCONCLUSIVE, "no estimate (no trials, or a zero count where a ratio needs one)")
    if obs.undecided:
        return Judgement(INCONCLUSIVE, obs.undecided)
    if rule in ("exact", "rel_tol", "abs_tol", "level_spacing"):
        return Judgement(CONSISTENT if check(obs, paper_value, tol, decimals) else INCONSISTENT)
    iv = _interval_of(obs, tol)
    if rule == "ci":
        pv = float(paper_value)
        p = paper_interval(pv, decimals)
        if iv is None:
            return Judgement(CONSISTENT if p[0] <= float(v) <= p[1] else INCONSISTENT)
        if not _overlaps(p, iv):
            return Judgement(INCONSISTENT)
        if null is None:
            return Judgement(CONSISTENT)
        if p[0] <= null <= p[1]:  # the paper reports no effect: our interval must stay within its precision
            if p[0] <= iv[0] and iv[1] <= p[1]:
                return Judgement(CONSISTENT)
            edge = p[1] if iv[1] > p[1] else p[0]
            return Judgement(
                INCONCLUSIVE,
                f"our interval {_fmt_iv(iv)} reaches past {_fmt_num(edge)}, beyond the printed precision of the "
                f"paper's no-effect value {paper_value}",
                n_to_separate(obs, null, edge, iv, transform),
            )
        if iv[0] <= null <= iv[1]:
            n_a = n_to_separate(obs, pv, null, iv, transform)
            n_b = n_to_separate(obs, null, pv, iv, transform) if obs.proportion_scale else None
            ns = [n for n in (n_a, n_b) if n is not None]
            return Judgement(
                INCONCLUSIVE,
                f"our interval {_fmt_iv(iv)} also contains the no-effect value {_fmt_num(null)}",
                max(ns) if ns else None,
            )
        return Judgement(CONSISTENT)
    lo, hi = iv if iv is not None else (float(v), float(v))
    if rule in ("upper_bound", "lower_bound"):
        b, inclusive = float(paper_value), bool(tol.get("inclusive"))
        if rule == "upper_bound":
            wrong = lo > b if inclusive else lo >= b
            right = hi <= b if inclusive else hi < b
        else:
            wrong = hi < b if inclusive else hi <= b
            right = lo >= b if inclusive else lo > b
        if wrong:
            return Judgement(INCONSISTENT)
        if right:
            return Judgement(CONSISTENT)
        return Judgement(
            INCONCLUSIVE,
            f"our interval {_fmt_iv((lo, hi))} contains the bound {_fmt_num(b)}",
            n_to_separate(obs, float(v), b, iv, transform) if v is not None else None,
        )
    if rule == "range":
        a, b = float(paper_value[0]), float(paper_value[1])
        if not _overlaps((a, b), (lo, hi)):
            return Judgement(INCONSISTENT)
        if a <= lo and hi <= b:
            return Judgement(CONSISTENT)
        edges = [e for e, crossed in ((a, lo < a), (b, hi > b)) if crossed]
        if v is not None and not a <= float(v) <= b:  # outside: the nearest edge decides (towards inconsistent)
            edges = [min((a, b), key=lambda e: abs(e - float(v)))]
        ns = [n_to_separate(obs, float(v), e, iv, transform) for e in edges] if v is not None else []
        ns = [n for n in ns if n is not None]
        return Judgement(
            INCONCLUSIVE,
            f"our interval {_fmt_iv((lo, hi))} reaches outside the range {_fmt_num(a)}–{_fmt_num(b)}",
            max(ns) if ns else None,
        )
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
    row = AuditRow(
        id=str(entry["id"]),
        ref=int(entry["ref"]),
        description=entry["description"],
        paper_text=str(entry.get("paper_text", "")),
        paper_value=entry.get("paper_value"),
        unit=entry.get("unit", ""),
        formula=entry["formula"],
        rule=_rule_text(tol),
        verdict=NOT_RUN,
        notes=notes,
    )
    mapped = ctx.model_map.get(src.get("model", ""))
    if mapped:
        row.notes = (notes + " " if notes else "") + f"Compared against stand-in model {mapped}."
    try:
        obs = FORMULAS[entry["formula"]](ctx, entry, src)
    except NotRun as exc:
        row.verdict, row.reason = NOT_RUN, str(exc)
        row.not_run_cause = MISSING_FIELD if isinstance(exc, MissingField) else MISSING_INPUT
        return row
    except NotTestable as exc:
        row.verdict, row.reason = NOT_TESTABLE, str(exc)
        return row
    except NotImplementedHere as exc:
        row.verdict, row.reason = NOT_IMPLEMENTED, str(exc)
        return row
    row.observations = [
        {
            "label": o.label,
            "value": o.value,
            "ci": list(o.ci) if o.ci else None,
            "n": o.n,
            **({"spacing": o.spacing} if o.spacing is not None else {}),
            **o.details,
        }
        for o in obs
    ]
    null, transform = null_value(entry), _transform(entry)
    judged = [
        judge(o, entry.get("paper_value"), tol, decimals=entry.get("decimals"), null=null, transform=transform)
        for o in obs
    ]
    verdicts = {j.verdict for j in judged}
    if INCONSISTENT in verdicts:
        if entry.get("on_mismatch") == "not_run":
            row.verdict, row.not_run_cause = NOT_RUN, DESIGN_DIFFERS
            row.reason = f"this configuration uses {_fmt_values(obs)} (paper design: {row.paper_text})"
        else:
            row.verdict = INCONSISTENT
    elif INCONCLUSIVE in verdicts:
        undecided = [(o, j) for o, j in zip(obs, judged) if j.verdict == INCONCLUSIVE]
        reasons = [(f"{o.label}: " if len(obs) > 1 and o.label else "") + j.reason for o, j in undecided]
        ns = [j.n_to_decide for _, j in undecided if j.n_to_decide is not None]
        row.verdict, row.reason = INCONCLUSIVE, "; ".join(reasons)
        row.n_to_decide = max(ns) if ns else None
        if row.n_to_decide is not None:
            row.reason += f"; n that would decide it: {row.n_to_decide:,}"
    else:
        row.verdict = CONSISTENT
    return row


# ----------------------------------------------------------------------------------------------- rendering


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


def verdict_counts(rows: Sequence[AuditRow]) -> dict[str, int]:
    """Number of rows per verdict, sorted by verdict."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    return dict(sorted(counts.items()))


def display_row(r: AuditRow) -> dict[str, str]:
    """The table cells of one audit row as text (shared by the Markdown and the HTML rendering)."""
    obs = r.observations
    ours = (
        "; ".join(_fmt_num(o["value"]) + (f" ({o['label']})" if len(obs) > 1 and o["label"] else "") for o in obs)
        or "—"
    )
    ci = "; ".join(f"[{_fmt_num(o['ci'][0])}, {_fmt_num(o['ci'][1])}]" if o.get("ci") else "—" for o in obs) or "—"
    n = "; ".join(_fmt_num(o.get("n")) for o in obs) or "—"
    note = " ".join(x for x in (r.reason, r.notes) if x).replace("\n", " ")
    return {
        "id": r.id,
        "description": r.description,
        "paper": r.paper_text,
        "ours": ours,
        "ci": ci,
        "n": n,
        "rule": r.rule,
        "verdict": r.verdict,
        "note": note,
    }


def _intro(header: Mapping[str, Any]) -> tuple[str, str]:
    run = header.get("run_name") or ""
    title = f"Paper numbers audit{f' ({run})' if run else ''}"
    return title, (
        f"Paper: {header.get('paper', '')}. Table: `{header.get('table', '')}`, one row per printed "
        "number. Rates in percent; intervals are 95 %."
    )


def verdict_slug(verdict: str) -> str:
    """A verdict as a CSS class name: "inconclusive (underpowered)" → "inconclusive-underpowered"."""
    return "-".join("".join(ch if ch.isalnum() else " " for ch in verdict).split())


def render_markdown(rows: Sequence[AuditRow], header: Mapping[str, Any]) -> str:
    """The audit table in Markdown (``paper_numbers.md``)."""
    title, intro = _intro(header)
    lines = [
        f"# {title}",
        "",
        intro,
        "",
        CONSISTENCY_DEFINITION,
        "**Summary:** " + ", ".join(f"{verdict}: {count}" for verdict, count in verdict_counts(rows).items()),
        "",
        "| id | number | paper | ours | 95% CI | n | rule | verdict | reason / notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = display_row(r)
        note = d["note"].replace("|", "\\|")
        lines.append(
            f"| {d['id']} | {d['description']} | {d['paper']} | {d['ours']} | {d['ci']} | {d['n']} | "
            f"{d['rule']} | **{d['verdict']}** | {note} |"
        )
    return "\n".join(lines) + "\n"


def template_env() -> jinja2.Environment:
    """The Jinja2 environment of the package's HTML pages (``esr/templates``; autoescaped, strict)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("esr", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(rows: Sequence[AuditRow], header: Mapping[str, Any]) -> str:
    """The audit as a self-contained HTML page (template ``esr/templates/audit.html.j2``, autoescaped)."""
    title, _ = _intro(header)
    run = header.get("run_name") or ""
    return (
        template_env()
        .get_template("audit.html.j2")
        .render(
            page_title=f"esr audit: {run}" if run else "esr audit",
            title=title,
            paper=header.get("paper", ""),
            table=header.get("table", ""),
            intro=DEFINITION_INTRO,
            definition=DEFINITION_ITEMS,
            counts=verdict_counts(rows),
            rows=[display_row(r) for r in rows],
            verdict_class={v: verdict_slug(v) for v in VERDICTS},
        )
    )


def audit(
    index: CellIndex,
    config: Mapping[str, Any] | None,
    table: Mapping[str, Any] | None = None,
    model_map: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike = ".",
) -> list[AuditRow]:
    """Evaluate every entry of the table (default: the packaged one) against a run's summary cells."""
    table = table or load_paper_table()
    ctx = AuditContext(index, config, dict(model_map or {}), list((table.get("models") or {}).values()), Path(base_dir))
    return [evaluate_entry(e, ctx) for e in table["numbers"]]


def build_audit(
    summary_paths: Sequence[str | os.PathLike],
    *,
    out_json: str | os.PathLike,
    out_md: str | os.PathLike,
    out_html: str | os.PathLike,
    config: Mapping[str, Any] | None,
    model_map: Mapping[str, str] | None = None,
) -> list[AuditRow]:
    """Snakemake ``audit`` entry: audit the packaged table over the cells of ``summary_paths`` and write
    ``paper_numbers.json``, ``paper_numbers.md`` and the HTML page; returns the rows.

    ``model_map`` (paper model key → configured model key) lets a stand-in model (e.g. the embedded default) be
    compared with a paper model's numbers; rows compared that way say so in their notes."""
    rows = audit(CellIndex.from_files(summary_paths), config, load_paper_table(), model_map)
    header = {"run_name": (config or {}).get("run_name", ""), "paper": PAPER, "table": DEFAULT_TABLE}
    out = {
        "schema": AUDIT_SCHEMA,
        **header,
        "definition": CONSISTENCY_DEFINITION,
        "verdict_counts": verdict_counts(rows),
        "model_map": dict(model_map or {}),
        "inputs": [str(p) for p in summary_paths],
        "provenance": provenance(dict(config) if config is not None else None),
        "numbers": [r.to_dict() for r in rows],
    }
    io.write_json(out_json, out)
    io.write_text(out_md, render_markdown(rows, header))
    io.write_text(out_html, render_html(rows, header))
    return rows


# ----------------------------------------------------------------------------------------------- self-check


def summary_cells_under(results_dir: str | os.PathLike) -> list[Mapping[str, Any]]:
    """Every summary cell (schema ``esr.summary/1``) of every JSON file under ``results_dir`` (recursively)."""
    cells: list[Mapping[str, Any]] = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            doc = io.read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(doc, Mapping) and doc.get("schema") == SUMMARY_SCHEMA:
            cells.extend(doc.get("cells") or [])
    return cells


def not_run_rows_with_inputs(
    audit_json: str | os.PathLike,
    results_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    table: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike = ".",
) -> list[dict[str, Any]]:
    """Rows of a written audit (``paper_numbers.json``) marked "not run" although their inputs exist in the run.

    Each "not run" row (except those whose design differs from the paper's, ``on_mismatch: not_run``) is evaluated
    again over every summary cell under ``results_dir`` with ``config`` (default: the config recorded in the audit's
    provenance) and the audit's ``model_map``. A row is listed when it now evaluates (the audit rule was given too
    few summaries or another config), or when the summary cell it selects exists but lacks the field, metric or
    value it reads (the table reads a key the code never writes). Returns one dict per such row: ``id``,
    ``reason`` (the audit's), ``found`` (what the re-evaluation gave). Raises KeyError for a row id the table
    lacks. Used by the tiny-workflow tests: on a healthy run the list is empty."""
    doc = io.read_json(audit_json)
    table = table or load_paper_table()
    entries = {str(e["id"]): e for e in table["numbers"]}
    cfg = config if config is not None else (doc.get("provenance") or {}).get("config")
    ctx = AuditContext(
        CellIndex(summary_cells_under(results_dir)),
        cfg,
        dict(doc.get("model_map") or {}),
        list((table.get("models") or {}).values()),
        Path(base_dir),
    )
    out = []
    for row in doc.get("numbers", []):
        if row.get("verdict") != NOT_RUN or row.get("not_run_cause") == DESIGN_DIFFERS:
            continue
        again = evaluate_entry(entries[str(row["id"])], ctx)
        if again.verdict in (NOT_IMPLEMENTED, NOT_TESTABLE) or (
            again.verdict == NOT_RUN and again.not_run_cause != MISSING_FIELD
        ):
            continue  # the input is absent, the design differs from the paper's, or nothing can run it
        found = (
            f"the cell exists but: {again.reason}"
            if again.verdict == NOT_RUN
            else f"evaluates to {again.verdict} ({display_row(again)['ours']})"
        )
        out.append({"id": row["id"], "reason": row.get("reason", ""), "found": found})
    return out

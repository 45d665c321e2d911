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
from esr.metrics import MeanEstimate, Proportion, pooled_mean, wilson_interval
from esr.provenance import provenance
from esr.stats import relative_change

AUDIT_SCHEMA = "esr.paper_numbers/1"
PAPER = "McKenzie et al., arXiv 2602.06941 v1"
DEFAULT_TABLE = "esr/data/paper_numbers.yaml"

CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
NOT_RUN = "not run in this configuration"
NOT_TESTABLE = "not testable"

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
    _b("Verdicts."), " Each paper number is compared with our estimate and its 95 % interval:"
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
            _runs("means (", _code("ci"), " rule): it overlaps our mean ± 1.96·SE interval (SD with ddof = 1);"),
            _runs(
                "ratios and relative changes (",
                _code("ci"),
                " rule): it overlaps the Katz log-ratio 95 % interval "
                "computed from our unrounded counts (independent-samples formula, conservative for paired replays);",
            ),
            _runs(
                'bounds ("< 1 %", "> 95 %"): our interval reaches the claimed side of the bound (the claim is not '
                "rejected);"
            ),
            _runs('ranges ("88–92", "93–97 %"): our interval overlaps the range;'),
            _runs(
                "constants and design values (",
                _code("exact"),
                "): equal; design counts (",
                _code("rel_tol"),
                "): within the stated relative tolerance;",
            ),
            _runs(
                "peak locations (", _code("level_spacing"), "): within one boost-level spacing of the paper's location;"
            ),
            _runs("claims over several cells (every judge pair, every random set) must hold for each of them."),
        ),
    ),
    (_runs(_b(INCONSISTENT), " otherwise."), ()),
    (
        _runs(
            _b(NOT_RUN),
            ": the run that would produce the number (model, experiment, summary cell or config key) is "
            "not part of this configuration; the reason is given.",
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
    """All summary cells of a run, searchable by experiment, model and cell-label pattern (``fnmatch``)."""

    def __init__(self, cells: Sequence[Mapping[str, Any]]):
        self.cells = list(cells)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike]) -> CellIndex:
        cells: list[Mapping[str, Any]] = []
        for p in paths:
            cells.extend(io.read_json(p).get("cells", []))
        return cls(cells)

    def find(self, experiment: str, model: str, cell: str = "*") -> list[Mapping[str, Any]]:
        return [
            c
            for c in self.cells
            if c.get("experiment") == experiment
            and c.get("model") == model
            and fnmatch.fnmatchcase(str(c.get("cell")), cell)
        ]

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


def _rate_obs(c: Mapping[str, Any], metric: str, unit: str) -> Obs:
    m = c["metrics"][metric]
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
    )


def _mean_obs(c: Mapping[str, Any], metric: str) -> Obs:
    m = c["metrics"][metric]
    ci = m.get("ci")
    return Obs(
        m.get("mean"),
        None if not ci or ci[0] is None else (ci[0], ci[1]),
        m.get("n"),
        str(c.get("cell")),
        details={"sd": m.get("sd"), "bootstrap": m.get("bootstrap")},
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
    k = sum(int(c["metrics"][src["metric"]]["k"]) for c in cells)
    n = sum(int(c["metrics"][src["metric"]]["n"]) for c in cells)
    p, ci, s = Proportion(k, n), wilson_interval(k, n), _scale(e["unit"])
    return [
        Obs(
            p.estimate * s if n else None,
            (ci.lo * s, ci.hi * s) if n else None,
            n,
            f"pooled over {len(cells)}",
            details={"k": k, "n": n, "cells": len(cells)},
        )
    ]


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
            raise NotRun(f"summary cell {c.get('experiment')}/{c.get('cell')} has no field {src['field']}") from None
        if v is None:
            raise NotRun(f"summary cell {c.get('experiment')}/{c.get('cell')} has no value for {src['field']}")
        out.append(Obs(v, None, c.get("n"), str(c.get("cell"))))
    return out


def _f_pooled_count(ctx, e, src):
    cells = _pooled_cells(ctx, src)
    return [Obs(sum(int(_get_path(c, src["field"])) for c in cells), None, None, f"pooled over {len(cells)}")]


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
    cells = [
        c
        for c in _cells(ctx, {**src, "cell": src.get("cell", "level=*")})
        if (c.get("extra") or {}).get("boost_sigma") is not None
    ]
    cells.sort(key=lambda c: c["extra"]["boost_sigma"])
    if len(cells) < 2:
        raise NotRun("fewer than two boost levels in σ units summarised (global levels)")
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
        return [
            Obs(
                float(x[i]),
                None,
                ms[i]["n"],
                f"level {i}",
                spacing=spacing,
                details={"boost": cells[i]["extra"]["boost"]},
            )
        ]
    return [
        Obs(
            float(est[i] * s),
            (float(lo[i] * s), float(hi[i] * s)),
            ms[i]["n"],
            f"boost_sigma={x[i]:.3g}",
            details={"smoothed": sig > 0},
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
                m["estimate"] * s, (m["wilson"][0] * s, m["wilson"][1] * s), m["n"], f"{p['judge_a']} vs {p['judge_b']}"
            )
        )
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
        return row
    except NotTestable as exc:
        row.verdict, row.reason = NOT_TESTABLE, str(exc)
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
    ok = all(check(o, entry.get("paper_value"), tol, entry.get("decimals")) for o in obs)
    if any(o.value is None and o.ci is None for o in obs):
        row.reason = "no estimate (no included trials in the denominator)"
    if not ok and entry.get("on_mismatch") == "not_run":
        row.verdict = NOT_RUN
        row.reason = f"this configuration uses {_fmt_values(obs)} (paper design: {row.paper_text})"
    else:
        row.verdict = CONSISTENT if ok else INCONSISTENT
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


def _template_env() -> jinja2.Environment:
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
        _template_env()
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
            verdict_class={v: v.replace(" ", "-") for v in (CONSISTENT, INCONSISTENT, NOT_RUN, NOT_TESTABLE)},
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

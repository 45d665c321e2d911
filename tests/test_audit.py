"""The audit of the paper's numbers: the table, the tolerance rules, verdicts, and the JSON / Markdown / HTML."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from esr.audit import (
    CONSISTENT,
    FORMULAS,
    INCONCLUSIVE,
    INCONSISTENT,
    NOT_IMPLEMENTED,
    NOT_RUN,
    NOT_TESTABLE,
    AuditRow,
    CellIndex,
    Obs,
    audit,
    build_audit,
    check,
    judge,
    load_paper_table,
    not_run_rows_with_inputs,
    paper_interval,
    printed_decimals,
    render_html,
    verdict_counts,
)
from esr.metrics import MeanEstimate, Proportion, z_for
from esr.summaries import summarise_experiment
from esr.trials import write_trials

from helpers import exp1_and_ablation_tables

PAPER_MODELS = ["llama-3.3-70b", "llama-3.1-8b", "gemma-2-27b", "gemma-2-9b", "gemma-2-2b"]


def cell(experiment, model, label, n, k_multi, k_esr, first=(26.3, 20.0), extra=None, **more):
    """A summary cell shaped like ``summarise_experiment`` output (only the fields the audit reads)."""
    first_m = MeanEstimate(n, first[0], first[1])
    return {
        "experiment": experiment,
        "model": model,
        "cell": label,
        "n": n,
        "metrics": {
            "multi_rate": Proportion(k_multi, n).to_dict(),
            "esr_rate": Proportion(k_esr, n).to_dict(),
            "improvement_rate": Proportion(k_esr, k_multi).to_dict(),
            "first_score": first_m.to_dict(),
        },
        "extra": extra or {},
        **more,
    }


def config(models=PAPER_MODELS, **over):
    cfg = {
        "run_name": "t",
        "prompts": {"path": "prompts.txt"},
        "calibration": {"target": 0.3},
        "models": {m: {"injection_layer": 33, "repetition_penalty": 1.2} for m in models},
    }
    cfg.update(over)
    return cfg


def rows_by_id(rows):
    return {r.id: r for r in rows}


# --------------------------------------------------------------------------------------- table


def test_table_covers_every_section8_row_with_known_formulas():
    t = load_paper_table()
    assert sorted({e["ref"] for e in t["numbers"]}) == list(range(1, 47))
    ids = [e["id"] for e in t["numbers"]]
    assert len(ids) == len(set(ids))
    rules = {"ci", "upper_bound", "lower_bound", "range", "exact", "rel_tol", "abs_tol", "level_spacing"}
    for e in t["numbers"]:
        assert e["formula"] in FORMULAS, e["id"]
        assert e["formula"] in ("not_testable", "not_implemented") or e["tolerance"]["rule"] in rules, e["id"]


def test_printed_precision():
    assert printed_decimals(3.8) == 1 and printed_decimals(0.0119) == 4 and printed_decimals(26) == 0
    assert paper_interval(3.8) == pytest.approx((3.75, 3.85))
    assert paper_interval(0) == pytest.approx((-0.5, 0.5))


def test_check_rules():
    assert check(Obs(3.79, (3.29, 4.37)), 3.8, {"rule": "ci"})
    assert not check(Obs(2.05, (1.69, 2.49)), 3.8, {"rule": "ci"})
    assert check(Obs(0.66, (0.45, 0.95)), 1.0, {"rule": "upper_bound"})
    assert not check(Obs(1.77, (1.43, 2.2)), 1.0, {"rule": "upper_bound"})
    assert check(Obs(1.1, (1.0, 1.1)), 1.0, {"rule": "upper_bound", "inclusive": True})
    assert check(Obs(94, (92.0, 95.5)), 95, {"rule": "lower_bound"})
    assert not check(Obs(90, (88.0, 91.6)), 95, {"rule": "lower_bound"})
    assert check(Obs(87, (86.0, 88.2)), [88, 92], {"rule": "range"})
    assert check(Obs(4700), 4877, {"rule": "rel_tol", "tol": 0.05})
    assert not check(Obs(4000), 4877, {"rule": "rel_tol", "tol": 0.05})
    assert check(Obs(30.000000000000004), 30, {"rule": "exact"})
    assert check(Obs(-0.5, spacing=0.67), -1.0, {"rule": "level_spacing"})
    assert not check(Obs(0.5, spacing=0.67), -1.0, {"rule": "level_spacing"})


# --------------------------------------------------------------------------------------- verdicts


def _paper_like_cells():
    cells = [
        cell("exp1", "llama-3.3-70b", "baseline", 4877, 361, 185, first=(26.3, 20.0)),
        cell("exp1", "llama-3.1-8b", "baseline", 4512, 85, 80),  # ESR 1.77 %: violates "< 1 %"
        cell(
            "exp3",
            "llama-3.3-70b",
            "ablation_set=otd_paper_26",
            4875,
            268,
            137,
            first=(27.4, 20.0),
            extra={"n_ablated_latents": 26},
        ),
        cell(
            "exp7",
            "all",
            "all",
            1000,
            100,
            50,
            extra={"n_judges": 5, "n_samples": 1000},
            judge_pairs=[
                {
                    "judge_a": "a",
                    "judge_b": "b",
                    "multi_agreement": Proportion(990, 1000).to_dict(),
                    "esr_direction_agreement": Proportion(95, 100).to_dict(),
                },
                {
                    "judge_a": "a",
                    "judge_b": "c",
                    "multi_agreement": Proportion(900, 1000).to_dict(),
                    "esr_direction_agreement": Proportion(94, 100).to_dict(),
                },
            ],
        ),
    ]
    for m in PAPER_MODELS:
        cells.append(cell("exp8", m, "baseline", 2600, 0, 0, first=(90.0, 10.0)))
    return cells


def test_verdicts_on_crafted_summaries(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(38)) + "\n\n")
    rows = rows_by_id(audit(CellIndex(_paper_like_cells()), config(), base_dir=tmp_path))
    assert rows["3"].verdict == CONSISTENT and rows["4"].verdict == CONSISTENT
    assert rows["3"].observations[0]["k"] == 185
    assert rows["5.8b"].verdict == INCONSISTENT
    assert rows["6.8b"].verdict == INCONSISTENT  # 85/4512 = 1.88 %, Wilson lower 1.53 % > 1.1 %
    assert rows["5.g27"].verdict == NOT_RUN and "no summary" in rows["5.g27"].reason
    assert rows["7.70b"].verdict == CONSISTENT
    assert rows["23.change"].verdict == CONSISTENT  # −25.7 % from counts, CI covers −25 %
    assert rows["23.change"].observations[0]["value"] == pytest.approx(-25.7313, abs=1e-3)
    assert rows["22.abl"].verdict == CONSISTENT and rows["20"].verdict == CONSISTENT
    assert rows["11.rate"].verdict == CONSISTENT and rows["11.n"].verdict == CONSISTENT  # 13,000 vs 13,118
    assert rows["10.8b"].verdict == INCONSISTENT  # 90 ± 0.38 vs 87.8
    assert rows["10.70b"].verdict == CONSISTENT  # inside 88–92
    assert rows["39"].verdict == INCONSISTENT  # pair a–c: 90 % (Wilson upper < 95 %)
    # 95/100 and 94/100: Wilson [88.8, 97.8] and [87.5, 97.2] reach outside 93–97 %: not decided at n = 100
    assert rows["40"].verdict == INCONCLUSIVE and rows["40"].n_to_decide > 100
    assert rows["38.judges"].verdict == CONSISTENT
    assert rows["1"].verdict == CONSISTENT and rows["9"].verdict == CONSISTENT
    assert rows["2.70b"].verdict == CONSISTENT
    assert rows["43"].verdict == INCONSISTENT  # paper text 1.1, code/config 1.2
    assert rows["44"].verdict == NOT_TESTABLE and rows["45"].verdict == NOT_TESTABLE
    assert rows["14"].verdict == CONSISTENT and rows["14"].observations[0]["value"] == pytest.approx(30)
    assert rows["37.r"].verdict == NOT_IMPLEMENTED and rows["42.first"].verdict == NOT_IMPLEMENTED
    assert rows["25"].verdict == NOT_RUN
    assert rows["46"].verdict == CONSISTENT


def test_not_run_for_models_outside_the_configuration():
    rows = rows_by_id(
        audit(CellIndex([cell("exp1", "smollm2-135m", "baseline", 500, 10, 5)]), config(models=["smollm2-135m"]))
    )
    assert rows["3"].verdict == NOT_RUN and "llama-3.3-70b is not in this configuration" in rows["3"].reason
    assert rows["1"].verdict == NOT_RUN and "1" in rows["1"].reason  # design differs: 1 model, not 5
    mapped = rows_by_id(
        audit(
            CellIndex([cell("exp1", "smollm2-135m", "baseline", 500, 40, 19)]),
            config(models=["smollm2-135m"]),
            model_map={"llama-3.3-70b": "smollm2-135m"},
        )
    )
    assert mapped["3"].verdict == CONSISTENT and "stand-in" in mapped["3"].notes


def test_sweep_peak():
    levels = [(-1.5, 0.0), (-0.83, 2.0), (-0.17, 4.0), (0.5, 6.0), (1.17, 8.0)]
    multi = [5, 12, 14, 8, 3]
    cells = [
        cell("exp2", "llama-3.3-70b", f"level=global:{s:+.2f}sd", 500, k, 3, extra={"boost": b, "boost_sigma": s})
        for (s, b), k in zip(levels, multi)
    ]
    rows = rows_by_id(audit(CellIndex(cells), config()))
    assert rows["15.location"].observations[0]["value"] == pytest.approx(-0.17)
    assert rows["15.location"].verdict == CONSISTENT  # |−0.17 − (−0.3)| ≤ spacing 0.67
    assert rows["12"].observations[0]["value"] == 5 and rows["12"].verdict == INCONSISTENT
    assert rows["13.a"].verdict == CONSISTENT


def test_table_selects_cells_not_conditions():
    for e in load_paper_table()["numbers"]:
        src = e.get("source") or {}
        for part in [src] + [v for v in src.values() if isinstance(v, dict)]:
            assert "condition" not in part, e["id"]


def test_exp9_values_come_from_the_group_cell():
    c = {
        "experiment": "exp9",
        "model": "llama-3.3-70b",
        "cell": "group=otd_paper_26",
        "n": 146,
        "values": {
            "offtopic_baseline_ratio": {"estimate": 4.3, "ci": [3.9, 4.8], "n": 146},
            "n_episodes": {"estimate": 146, "ci": None, "n": None},
        },
    }
    rows = rows_by_id(audit(CellIndex([c]), config()))
    assert rows["25"].verdict == CONSISTENT and rows["25"].observations[0]["label"] == "group=otd_paper_26"
    assert rows["33"].verdict == CONSISTENT
    assert rows["26"].verdict == NOT_RUN and "ontopic_baseline_ratio" in rows["26"].reason


# --------------------------------------------------------------------------------------- end to end


class _Rows(HTMLParser):
    """Counts the <tr> elements inside <tbody> and collects the text of the element with id ``verdict-counts``."""

    def __init__(self):
        super().__init__()
        self.body_rows, self.in_body, self.in_counts, self.counts = 0, False, False, ""

    def handle_starttag(self, tag, attrs):
        self.in_body |= tag == "tbody"
        self.body_rows += tag == "tr" and self.in_body
        self.in_counts |= dict(attrs).get("id") == "verdict-counts"

    def handle_endtag(self, tag):
        self.in_body &= tag != "tbody"
        self.in_counts &= tag != "p"

    def handle_data(self, data):
        if self.in_counts:
            self.counts += data


def _parse(html):
    p = _Rows()
    p.feed(html)
    return p


def test_build_audit_writes_json_markdown_and_html(tmp_path):
    base, abl = exp1_and_ablation_tables()
    paths = [tmp_path / "base.parquet", tmp_path / "abl.parquet"]
    write_trials(paths[0], base, "graded")
    write_trials(paths[1], abl, "graded")
    summarise_experiment(paths, tmp_path / "summary.json", n_boot=200)

    out_json, out_md, out_html = tmp_path / "paper_numbers.json", tmp_path / "paper_numbers.md", tmp_path / "a.html"
    rows = build_audit(
        [tmp_path / "summary.json"],
        out_json=out_json,
        out_md=out_md,
        out_html=out_html,
        config=config(models=["llama-3.3-70b"]),
        model_map={},
    )
    out = json.loads(out_json.read_text())
    by = {r["id"]: r for r in out["numbers"]}
    assert by["3"]["verdict"] == CONSISTENT  # 4.0 %, Wilson [2.95, 5.41] covers 3.8
    assert by["24.rate"]["verdict"] == CONSISTENT  # 2.0 %, Wilson [1.30, 3.07] covers 2.8
    assert by["22.base"]["verdict"] == INCONSISTENT  # every first score is 20 or 30 or 50
    assert by["20"]["verdict"] == CONSISTENT  # 26 distinct latents in the trials' `ablate`
    assert by["5.8b"]["verdict"] == NOT_RUN
    assert sum(out["verdict_counts"].values()) == len(rows) and out["verdict_counts"] == verdict_counts(rows)
    assert out["schema"] == "esr.paper_numbers/1" and "Wilson" in out["definition"]
    md = out_md.read_text()
    assert "consistent" in md and "Wilson" in md and all(f"| {r.id} |" in md for r in rows)

    html = out_html.read_text()
    parsed = _parse(html)
    assert parsed.body_rows == len(rows)
    for verdict, count in out["verdict_counts"].items():
        assert f"{verdict}: {count}" in parsed.counts
    assert "<title>esr audit: t</title>" in html and "Paper numbers audit (t)" in html
    assert "<b>Wilson</b>" in html and "<code>level_spacing</code>" in html and "**" not in html
    assert 'id="row-3" class="verdict-consistent"' in html


def test_html_escapes_text_from_rows_and_config():
    rows = [
        AuditRow(
            id="x",
            ref=1,
            description="a < b",
            paper_text="5",
            paper_value=5,
            unit="count",
            formula="constant",
            rule="exact",
            verdict=CONSISTENT,
            notes="<script>alert(1)</script>",
        ),
        AuditRow(
            id="y",
            ref=2,
            description="d",
            paper_text="6",
            paper_value=6,
            unit="count",
            formula="config",
            rule="exact",
            verdict=NOT_RUN,
            reason="no summary",
        ),
    ]
    html = render_html(rows, {"run_name": "<b>run</b>", "paper": "P", "table": "T"})
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &lt; b" in html and "<b>run</b>" not in html and "&lt;b&gt;run&lt;/b&gt;" in html
    parsed = _parse(html)
    assert parsed.body_rows == 2
    assert "consistent: 1" in parsed.counts and "not run in this configuration: 1" in parsed.counts


# --------------------------------------------------------------------------------------- verdicts that can fail


def _wilson_n(p_centre, target):
    """Smallest n at which the Wilson interval of the fraction p_centre excludes target, by brute force."""
    z = z_for(0.95)
    for n in range(1, 100000):
        denom = 1 + z * z / n
        centre = (p_centre + z * z / (2 * n)) / denom
        half = z / denom * (p_centre * (1 - p_centre) / n + z * z / (4 * n * n)) ** 0.5
        if not centre - half <= target <= centre + half:
            return n
    raise AssertionError("no n")


def test_rate_whose_interval_contains_zero_is_inconclusive_with_the_deciding_n():
    # the embedded run: SmolLM2 has 0/48 ESR; Wilson [0, 7.4] % overlaps the 70B's 3.8 % but also holds 0
    cells = [cell("exp1", "smollm2-135m", "baseline", 48, 0, 0)]
    rows = rows_by_id(
        audit(CellIndex(cells), config(models=["smollm2-135m"]), model_map={"llama-3.3-70b": "smollm2-135m"})
    )
    assert rows["3"].verdict == INCONCLUSIVE and "no-effect value" in rows["3"].reason
    # a Wilson interval around 0 excludes the paper's 3.8 % once n > z²(1 − p)/p = 97.3
    assert rows["3"].n_to_decide == _wilson_n(0.0, 0.038) == 98
    assert rows["4"].verdict == INCONCLUSIVE and rows["4"].n_to_decide == _wilson_n(0.0, 0.074) == 49
    # at n = 4877 the same rate is decided: 185/4877 = 3.79 %, Wilson [3.29, 4.37] % excludes 0
    rows = rows_by_id(audit(CellIndex([cell("exp1", "llama-3.3-70b", "baseline", 4877, 361, 185)]), config()))
    assert rows["3"].verdict == CONSISTENT and rows["3"].n_to_decide is None


def test_every_rule_can_be_inconclusive():
    obs = Obs(0.9, (0.65, 1.2), 4512, proportion_scale=100.0)  # straddles the bound "< 1 %"
    j = judge(obs, 1.0, {"rule": "upper_bound"})
    assert j.verdict == INCONCLUSIVE and j.n_to_decide == _wilson_n(0.009, 0.01)
    assert judge(Obs(0.6, (0.4, 0.9), 4512, proportion_scale=100.0), 1.0, {"rule": "upper_bound"}).verdict == CONSISTENT
    assert judge(Obs(1.8, (1.4, 2.2), 4512, proportion_scale=100.0), 1.0, {"rule": "upper_bound"}).verdict == (
        INCONSISTENT
    )
    lower = judge(Obs(97.0, (94.0, 99.0), 300, proportion_scale=100.0), 95, {"rule": "lower_bound"})
    assert lower.verdict == INCONCLUSIVE and lower.n_to_decide == _wilson_n(0.97, 0.95)
    # range of a mean (no proportion): our n scaled by (half-width / distance to the crossed edge)²
    rng = judge(Obs(91.0, (89.0, 93.0), 100), [88, 92], {"rule": "range"})
    assert rng.verdict == INCONCLUSIVE and rng.n_to_decide == 400  # 100 · (2 / 1)²
    assert judge(Obs(90.0, (89.5, 90.5), 2600), [88, 92], {"rule": "range"}).verdict == CONSISTENT
    assert judge(Obs(80.0, (79.0, 81.0), 2600), [88, 92], {"rule": "range"}).verdict == INCONSISTENT
    # a ratio whose Katz interval holds 1: n scaled on the log scale
    rat = judge(Obs(2.0, (0.8, 5.0), 200), 4.3, {"rule": "ci"}, null=1.0, transform=math.log)
    half = (np.log(5.0) - np.log(0.8)) / 2
    assert rat.verdict == INCONCLUSIVE and rat.n_to_decide == int(np.ceil(200 * (half / np.log(4.3)) ** 2))
    # a claim of no effect ("0 %"): our interval must stay inside its printed precision [0, 0.5] %
    zero = judge(Obs(0.0, (0.0, 3.7), 100, proportion_scale=100.0), 0, {"rule": "ci"}, null=0.0)
    assert zero.verdict == INCONCLUSIVE and zero.n_to_decide == _wilson_n(0.0, 0.005)
    assert judge(Obs(0.0, (0.0, 0.03), 13000, proportion_scale=100.0), 0, {"rule": "ci"}, null=0.0).verdict == (
        CONSISTENT
    )
    # no estimate at all (a zero count in a ratio) cannot be consistent
    assert judge(Obs(None), 4.3, {"rule": "ci"}, null=1.0).verdict == INCONCLUSIVE
    # counts and design values have no sampling error: never inconclusive
    assert judge(Obs(4000), 4877, {"rule": "rel_tol", "tol": 0.05}).verdict == INCONSISTENT


def test_flat_sweep_has_no_peak_location():
    levels = [(-1.5, 0.0), (-0.5, 2.0), (0.5, 4.0)]
    cells = [
        cell("exp2", "llama-3.3-70b", f"level=global:{s:+.2f}sd", 50, 0, 0, extra={"boost": b, "boost_sigma": s})
        for s, b in levels
    ]
    rows = rows_by_id(audit(CellIndex(cells), config()))
    assert rows["15.location"].verdict == INCONCLUSIVE and "no significant peak" in rows["15.location"].reason
    assert rows["15.value"].verdict == INCONCLUSIVE


def test_exp9_values_without_interval_use_the_stated_tolerance():
    def values(**v):
        return {
            "experiment": "exp9",
            "model": "llama-3.3-70b",
            "cell": "group=otd",
            "n": 146,
            "values": {k: {"estimate": x, "ci": None, "n": 146} for k, x in v.items()},
        }

    rows = rows_by_id(audit(CellIndex([values(otd_mean_off_topic=0.011, d_max=0.7, d_min=-0.2)]), config()))
    assert rows["27.off"].verdict == CONSISTENT  # 0.011 ± 25 % = [0.00825, 0.01375] holds 0.0119
    assert rows["28.top"].verdict == CONSISTENT  # 0.7 ± 0.2 holds 0.85
    assert rows["28.bottom"].verdict == INCONSISTENT  # −0.2 ± 0.2 misses −0.76
    rows = rows_by_id(audit(CellIndex([values(otd_mean_off_topic=0.02, d_max=0.1)]), config()))
    assert rows["27.off"].verdict == INCONSISTENT
    assert rows["28.top"].verdict == INCONSISTENT  # [−0.1, 0.3] misses 0.85


# --------------------------------------------------------------------------------------- rows that can never run


def _schema_has(schema, root, parts):
    node = root
    for part in parts:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].split("/")[-1]]
        props = node.get("properties") or {}
        if part in props:
            node = props[part]
        elif part == "{model}" and isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return False
    return True


def _summary_fields(tmp_path):
    """Every dotted path the summarisers write into a cell, from real summaries of synthetic trials."""
    from esr.sequential import summary_cell
    from esr.summaries import summarise_cross_judge, summarise_table

    from helpers import synthetic_trials

    base, abl = exp1_and_ablation_tables()
    sweep = synthetic_trials("exp2", "llama-3.3-70b", 4, 3, 4, boost_level="global:+0.50sd")
    cells = summarise_table(pd.concat([base, abl, sweep], ignore_index=True), bootstrap=None)
    regrade = pd.concat([base.assign(judge_id="original"), base.assign(judge_id="other")])
    write_trials(tmp_path / "regrade.parquet", regrade, "graded", unique=("trial_id", "judge_id"))
    cells += summarise_cross_judge([tmp_path / "regrade.parquet"], tmp_path / "exp7.json")["cells"]
    ratio = {"estimate": 4.0, "ci_low": 3.0, "ci_high": 5.0, "n_numerator": 10}
    region = {"mean": 0.01, "sd": 0.01, "n": 10}
    result = {
        "n_episodes": 10,
        "n_baseline": 5,
        "window": {"n_bins": 50},
        "groups": {
            "g": {
                "ratios": {"off_topic": ratio, "on_topic": ratio},
                "regions": {"off_topic": region, "on_topic": region, "baseline": region},
                "latent_tests": {"1": {"cohens_d_pooled": 0.5}},
            }
        },
    }
    cells.append(summary_cell("llama-3.3-70b", "g", result))

    paths = set()

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                paths.add(prefix + k)
                walk(v, prefix + k + ".")

    for c in cells:
        walk(c, "")
    return paths


def test_every_row_reads_inputs_the_code_writes(tmp_path):
    """Each key path a table row reads (config key, summary field, metric, exp9 value) is one the package writes
    or the config schema declares; rows nothing can produce are "not_implemented" / "not_testable"."""
    from esr.config import load_schema

    schema = load_schema()
    fields = _summary_fields(tmp_path)
    for e in load_paper_table()["numbers"]:
        src, f = e.get("source") or {}, e["formula"]
        parts = [src] + [v for v in src.values() if isinstance(v, dict)]
        if f == "config":
            assert _schema_has(schema, schema, src["path"].split(".")), (e["id"], src["path"])
        if f == "prompts_file":
            assert _schema_has(schema, schema, ["prompts", "path"])
        for part in parts:
            if "field" in part:
                assert part["field"] in fields, (e["id"], part["field"])
            if "metric" in part and f != "judge_agreement":
                assert f"metrics.{part['metric']}.k" in fields or f"metrics.{part['metric']}.mean" in fields, e["id"]
            if "key" in part:
                assert f"values.{part['key']}" in fields, (e["id"], part["key"])
        if f == "sweep_peak":
            assert {"extra.boost_sigma", "extra.boost"} <= fields
        if f == "judge_agreement":
            assert "judge_pairs" in fields


def test_not_run_rows_with_inputs(tmp_path):
    base, abl = exp1_and_ablation_tables()
    results = tmp_path / "results"
    for name, df in (("exp1", base), ("exp3", abl)):
        write_trials(tmp_path / f"{name}.parquet", df, "graded")
        (results / name).mkdir(parents=True)
        summarise_experiment([tmp_path / f"{name}.parquet"], results / name / "summary.json", n_boot=0)
    cfg = config(models=["llama-3.3-70b"])
    out = {k: tmp_path / f"a.{k}" for k in ("json", "md", "html")}

    def run_audit(summaries):
        build_audit(summaries, out_json=out["json"], out_md=out["md"], out_html=out["html"], config=cfg)
        return not_run_rows_with_inputs(out["json"], results, base_dir=tmp_path)

    # every summary given to the audit: nothing is "not run" while its inputs exist
    assert run_audit([results / "exp1/summary.json", results / "exp3/summary.json"]) == []
    # the audit rule forgot exp3's summary: its rows are "not run" though the summary exists
    missed = {r["id"] for r in run_audit([results / "exp1/summary.json"])}
    assert {"20", "21.abl", "22.abl", "23.rate", "23.change", "24.rate", "24.change"} == missed
    # a cell without the field a row reads (e.g. a summariser that stops writing n_ablated_latents)
    doc = json.loads((results / "exp3/summary.json").read_text())
    del doc["cells"][0]["extra"]["n_ablated_latents"]
    (results / "exp3/summary.json").write_text(json.dumps(doc))
    [row] = run_audit([results / "exp1/summary.json", results / "exp3/summary.json"])
    assert row["id"] == "20" and "n_ablated_latents" in row["found"]


def test_exp10_rows_take_the_controls_matched_to_the_papers_set_before_any_other():
    """The paper's 3 random sets were matched to otd_paper_26; the 70B's other matched groups must not be pooled in,
    and a stand-in model with only discovered-set controls still has its controls found (the fallback pattern)."""
    from esr.audit import CellIndex, load_paper_table

    rows = {r["id"]: r for r in load_paper_table()["numbers"]}
    pattern = rows["30.sets"]["source"]["cell"]
    cells = [
        {"experiment": "exp10", "model": "m", "cell": f"ablation_set=random_{s}_{i}"}
        for s in ("otd_paper_26", "discovered_separability")
        for i in range(3)
    ]
    found = CellIndex(cells).find("exp10", "m", pattern)
    assert sorted(c["cell"] for c in found) == [f"ablation_set=random_otd_paper_26_{i}" for i in range(3)]
    stand_in = CellIndex(cells[3:]).find("exp10", "m", pattern)
    assert len(stand_in) == 3 and all("discovered_separability" in c["cell"] for c in stand_in)
    assert CellIndex(cells).find("exp10", "m", "ablation_set=nothing") == []

"""Figures and the audit for the report: thin stage functions over ``esr.metrics``, ``esr.figures`` and
``esr.audit`` (the Snakemake rules in ``workflow/rules/stats.smk`` call these; ``snakemake --report`` gathers the
figures, tables and provenance into one HTML page)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from esr.io import write_json, write_text

log = logging.getLogger("esr.report")


def _load(paths: Sequence[str | Path]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _summary(df: pd.DataFrame):
    from esr.metrics import summarise

    return summarise(df)


def esr_by_model_figure(exp1_paths: Sequence[str | Path], out_png: str | Path, model_order: Sequence[str]) -> None:
    from esr.figures import figure_esr_by_model

    figure_esr_by_model(_load(exp1_paths), out_png, model_order=list(model_order))


def ablation_figure(model: str, exp1: str | Path, ablations: Mapping[str, str | Path], out_png: str | Path) -> None:
    """Fig 5 / A.14: exp1 (no ablation) vs each detector set (exp3) and each matched random set (exp10)."""
    from esr.figures import figure_ablation

    base = _load([exp1])
    conds = [("exp1: no ablation", _summary(base))]
    for label, path in ablations.items():
        df = _load([path])
        for cond in sorted(df["condition"].unique()) if len(df) else []:
            conds.append((f"{label}: {cond}", _summary(df[df["condition"] == cond])))
    figure_ablation(conds, out_png, model=model)


def meta_prompt_figure(model: str, exp1: str | Path, exp5: str | Path, out_png: str | Path) -> None:
    from esr.figures import figure_meta_prompt

    conds = [("exp1: no meta-prompt", _summary(_load([exp1])))]
    df = _load([exp5])
    for v in sorted(df["prompt_variant"].unique()) if len(df) else []:
        conds.append((v, _summary(df[df["prompt_variant"] == v])))
    figure_meta_prompt(conds, out_png, model=model)


def sweep_figure(model: str, exp2: str | Path, out_png: str | Path) -> None:
    from esr.figures import figure_boost_sweep, sweep_table

    df = _load([exp2])
    figure_boost_sweep(sweep_table(df), out_png, model=model)


def _inline(text: str) -> str:
    import html
    import re

    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def audit_markdown_to_html(md_path: str | Path, out_html: str | Path, title: str) -> None:
    """A small self-contained HTML rendering of the audit markdown (headings, paragraphs, nested bullet lists,
    bold/italic/code, tables) for the Snakemake report."""
    import html

    lines = Path(md_path).read_text(encoding="utf-8").splitlines()
    body: list[str] = []
    block: list[str] = []   # the paragraph or list item being collected
    list_depth = 0
    in_table = False

    def flush() -> None:
        if block:
            text = _inline(" ".join(x.strip() for x in block))
            body.append(f"<li>{text}</li>" if list_depth else f"<p>{text}</p>")
            block.clear()

    def set_depth(depth: int) -> None:
        nonlocal list_depth
        while list_depth < depth:
            body.append("<ul>")
            list_depth += 1
        while list_depth > depth:
            body.append("</ul>")
            list_depth -= 1

    for line in lines:
        stripped = line.strip()
        if stripped.startswith("|"):
            flush()
            set_depth(0)
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            tag = "td" if in_table else "th"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if not stripped:
            flush()
            set_depth(0)
        elif stripped.startswith("#"):
            flush()
            set_depth(0)
            level = min(len(stripped) - len(stripped.lstrip("#")), 4)
            body.append(f"<h{level}>{html.escape(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped[:2] in ("* ", "- "):
            flush()
            set_depth(1 + (len(line) - len(line.lstrip())) // 2)
            block.append(stripped[2:])
        else:
            block.append(stripped)
    flush()
    set_depth(0)
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;margin:1em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 5px;vertical-align:top}th{background:#eee}"
             "code{background:#f4f4f4}")
    write_text(out_html, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def fidelity_notes(config: Mapping[str, Any]) -> list[str]:
    """Where this run deviates from the paper or the authors' code, stated for the report."""
    notes = []
    judge = config.get("judge", {})
    if judge.get("backend") == "offline_minilm":
        notes.append("Judge: offline MiniLM relevance judge with restart-phrase segmentation, an APPROXIMATION of "
                     "the paper's Claude Haiku 4.5 judge.")
    cal_judge = config.get("calibration_judge") or judge
    if cal_judge != judge:
        notes.append(f"Boost calibration was scored by a different judge ({cal_judge.get('backend')}:"
                     f"{cal_judge.get('model')}) than the trials ({judge.get('backend')}:{judge.get('model')}).")
    if config.get("concreteness", {}).get("backend") == "wordnet":
        notes.append("Concreteness: WordNet heuristic, an APPROXIMATION of the paper's Claude Sonnet 4.5 grader.")
    sel = config.get("selection", {})
    notes.append(f"Relevance filter: {sel.get('relevance_filter')} (authors' code: zero_on_prompts; paper text: "
                 "top100_per_prompt).")
    cal = config.get("calibration", {})
    notes.append(f"Calibration: target {cal.get('target')}, {cal.get('n_steps')} bisection steps x "
                 f"{cal.get('samples_per_step')} samples, {cal.get('max_new_tokens')} tokens, confidence "
                 f"{cal.get('confidence', 'beta')} (authors: their Beta flip, 'authors_beta'). Cache keyed on the full "
                 "configuration (the authors keyed on the latent only).")
    gen = config.get("generation", {})
    notes.append(f"Generation: temperature {gen.get('temperature')}, max {gen.get('max_new_tokens')} new tokens "
                 f"(paper: 512), steering at {gen.get('steer_positions')} positions.")
    for name, m in config.get("models", {}).items():
        notes.append(f"{name}: inject at layer {m['injection_layer']}, SAE layer {m['sae_layer']}, repetition "
                     f"penalty {m['repetition_penalty']}, chat template {m.get('chat_template')}, dtype "
                     f"{m['dtype']}, engine {m.get('engine')} (tp {m.get('tensor_parallel')}).")
    exp = config.get("experiments", {})
    if exp.get("planted_control", {}).get("enabled"):
        notes.append("Planted positive control: a fraction of steered answers had a restart phrase and an unsteered "
                     "answer appended (experiment 'planted'); these are NOT model behaviour.")
    notes.append("Random ablation controls (exp10) are matched to the detector set on firing frequency and mean "
                 "activation (the authors' control sampled uniformly). Ablation and control runs are paired with "
                 "exp1 by latent, prompt and seed and tested with McNemar's exact test.")
    notes.append("Trials with no attempts are counted as exclusions (the authors' code dropped them silently); "
                 "Wilson intervals are primary, Wald shown for fidelity.")
    return notes


def run_overview(config: Mapping[str, Any], summary_jsons: Sequence[str | Path], audit_json: str | Path,
                 out_md: str | Path) -> None:
    """A short overview page (markdown) for the report: what ran, the fidelity notes, the audit verdict counts."""
    from esr.io import read_json

    audit = read_json(audit_json)
    lines = [f"# esr run '{config.get('run_name')}'", "", "## Fidelity notes", ""]
    lines += [f"- {n}" for n in fidelity_notes(config)]
    lines += ["", "## Audit verdicts", ""]
    lines += [f"- {k}: {v}" for k, v in audit.get("verdict_counts", {}).items()]
    lines += ["", "## Summaries", ""]
    for p in summary_jsons:
        s = read_json(p)
        for c in s.get("cells", []):
            m = c.get("metrics", {})
            esr, multi = m.get("esr_rate", {}), m.get("multi_rate", {})
            if esr:
                lines.append(f"- {c['experiment']} / {c['model']} / {c['condition']}: n={c.get('n')}, "
                             f"multi-attempt {multi.get('k')}/{multi.get('n')}, ESR {esr.get('k')}/{esr.get('n')}")
    write_text(out_md, "\n".join(lines) + "\n")
    write_json(Path(out_md).with_suffix(".json"), {"fidelity_notes": fidelity_notes(config)})

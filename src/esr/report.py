"""The report's run overview: where this run deviates from the paper or the authors' code (``fidelity_notes``) and
a short page of what ran with the audit's verdict counts (``run_overview``, written by the Snakemake ``audit`` rule;
``snakemake --report`` gathers it with the figures of ``esr.figures`` and the audit of ``esr.audit``). The
deviations concern the paper's methods (judge, latent selection, calibration, generation) and its experiments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esr.io import read_json, write_json, write_text


def fidelity_notes(config: Mapping[str, Any]) -> list[str]:
    """Where this run deviates from the paper or the authors' code, stated for the report."""
    notes = []
    judge = config.get("judge", {})
    if judge.get("backend") == "offline_minilm":
        notes.append(
            "Judge: offline MiniLM relevance judge with restart-phrase segmentation, an APPROXIMATION of "
            "the paper's Claude Haiku 4.5 judge."
        )
    threshold_judge = config.get("threshold_judge") or judge
    if threshold_judge != judge:
        notes.append(
            f"Boost calibration was scored by a different judge ({threshold_judge.get('backend')}:"
            f"{threshold_judge.get('model')}) than the trials ({judge.get('backend')}:{judge.get('model')})."
        )
    if config.get("concreteness", {}).get("backend") == "wordnet":
        notes.append("Concreteness: WordNet heuristic, an APPROXIMATION of the paper's Claude Sonnet 4.5 grader.")
    sel = config.get("selection", {})
    notes.append(
        f"Relevance filter: {sel.get('relevance_filter')} (authors' code: zero_on_prompts; paper text: "
        "top100_per_prompt)."
    )
    cal = config.get("calibration", {})
    notes.append(
        f"Calibration: target {cal.get('target')}, {cal.get('n_steps')} bisection steps x "
        f"{cal.get('samples_per_step')} samples, {cal.get('max_new_tokens')} tokens, confidence "
        f"{cal.get('confidence', 'beta')} (authors: their Beta flip, 'authors_beta'). Cache keyed on the full "
        "configuration (the authors keyed on the latent only)."
    )
    gen = config.get("generation", {})
    notes.append(
        f"Generation: temperature {gen.get('temperature')}, max {gen.get('max_new_tokens')} new tokens "
        f"(paper: 512), steering at {gen.get('steer_positions')} positions."
    )
    for name, m in config.get("models", {}).items():
        notes.append(
            f"{name}: inject at layer {m['injection_layer']}, SAE layer {m['sae_layer']}, repetition "
            f"penalty {m['repetition_penalty']}, chat template {m.get('chat_template')}, dtype "
            f"{m['dtype']}, engine {m.get('engine')} (tp {m.get('tensor_parallel')})."
        )
    exp = config.get("experiments", {})
    if exp.get("planted_control", {}).get("enabled"):
        notes.append(
            "Planted positive control: a fraction of steered answers had a restart phrase and an unsteered "
            "answer appended (experiment 'planted'); these are NOT model behaviour."
        )
    notes.append(
        "Random ablation controls (exp10) are matched to the detector set on firing frequency and mean "
        "activation (the authors' control sampled uniformly). Ablation and control runs are paired with "
        "exp1 by latent, prompt and seed and tested with McNemar's exact test."
    )
    notes.append(
        "Trials with no attempts are counted as exclusions (the authors' code dropped them silently); "
        "Wilson intervals are primary, Wald shown for fidelity."
    )
    return notes


def run_overview(
    config: Mapping[str, Any], summary_jsons: Sequence[str | Path], audit_json: str | Path, out_md: str | Path
) -> None:
    """A short overview page (markdown) for the report: what ran, the fidelity notes, the audit verdict counts."""
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
                lines.append(
                    f"- {c['experiment']} / {c['model']} / {c['cell']}: n={c.get('n')}, "
                    f"multi-attempt {multi.get('k')}/{multi.get('n')}, ESR {esr.get('k')}/{esr.get('n')}"
                )
    write_text(out_md, "\n".join(lines) + "\n")
    write_json(Path(out_md).with_suffix(".json"), {"fidelity_notes": fidelity_notes(config)})

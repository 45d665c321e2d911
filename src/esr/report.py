"""The report's run overview: where this run deviates from the paper or the authors' code (``fidelity_notes``) and
a short page of what ran with the audit's verdict counts (``run_overview``, written by the Snakemake ``audit`` rule;
``snakemake --report`` gathers it with the figures of ``esr.figures`` and the audit of ``esr.audit``). The
deviations concern the paper's methods (judge, latent selection, calibration, generation) and its experiments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esr import bundle
from esr.fidelity import fidelity_table
from esr.io import read_json, write_json, write_text


def fidelity_notes(config: Mapping[str, Any]) -> list[str]:
    """Where this run deviates from the paper or the authors' code, one sentence per entry of
    ``esr.fidelity.DEVIATIONS`` evaluated on the resolved ``config`` (see :func:`esr.fidelity.fidelity_table`)."""
    notes = []
    for row in fidelity_table(config):
        mark = {True: "as the reference", False: "DEVIATES", None: "stated"}[row["matches_reference"]]
        notes.append(
            f"{row['topic']} / {row['setting']}: {row['this_run']} [{mark}] (reference: {row['reference']}). "
            f"{row['note']}"
        )
    judge, threshold_judge = config.get("judge", {}), config.get("threshold_judge") or config.get("judge", {})
    if threshold_judge != judge:
        notes.append(
            f"Boost calibration was scored by a different judge ({threshold_judge.get('backend')}:"
            f"{threshold_judge.get('model')}) than the trials ({judge.get('backend')}:{judge.get('model')})."
        )
    return notes


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = ["topic", "setting", "this run", "paper / authors", "matches", "note"]
    keys = ["topic", "setting", "this_run", "reference", "matches_reference", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = {True: "yes", False: "**no**", None: "-"}
    out += [
        "| " + " | ".join(cell(shown[r[k]] if k == "matches_reference" else r[k]) for k in keys) + " |" for r in rows
    ]
    return out


def run_overview(
    config: Mapping[str, Any],
    summary_jsons: Sequence[str | Path],
    audit_json: str | Path,
    out_md: str | Path,
    *,
    bundle_root: str | Path | None = None,
    exp4_summary: str | Path | None = None,
) -> None:
    """A short overview page (markdown) for the report: what ran, the fidelity notes, the audit verdict counts.

    ``bundle_root``: the directory a results bundle was imported into (``esr.bundle``; None: not an import). The
    page then shows the bundle's provenance (code version, config hash, machine, date) and every recomputed value
    of the summaries and the audit table that differs from the one recorded in the bundle
    (:func:`esr.bundle.compare_recorded`); the JSON twin carries them under ``bundle``.

    ``exp4_summary``: exp4's sweep table (``results/exp4/summary.parquet``, rule summarise_exp4, with its
    ``transcripts.json`` beside it); its section (:func:`esr.exp4.report_section`) follows the audit verdicts. None:
    the section says in one line that exp4 is off."""
    audit = read_json(audit_json)
    lines = [f"# esr run '{config.get('run_name')}'", ""]
    bundle_block = None
    if bundle_root is not None and (manifest := bundle.imported_manifest(bundle_root)) is not None:
        diffs = bundle.compare_recorded(root=bundle_root, paths=[*summary_jsons, audit_json])
        bundle_block = {"manifest": {k: manifest.get(k) for k in ("created_utc", "machine", "exported_by", "run")}}
        bundle_block |= {"config": manifest.get("config"), "differences": diffs}
        lines += ["## Recomputed from a results bundle", ""] + bundle.provenance_lines(manifest) + [""]
        if diffs:
            lines += [f"**{len(diffs)} recomputed value(s) DIFFER from the numbers recorded in the bundle:**", ""]
            lines += [
                f"- {d['path']} {d['key']}: recorded {d['recorded']}, recomputed {d['recomputed']}" for d in diffs
            ]
        else:
            lines.append("Every recomputed summary value and audit row equals the one recorded in the bundle.")
        lines.append("")
    lines += ["## Fidelity: where this run deviates from the paper", ""]
    lines += _markdown_table(fidelity_table(config))
    lines += [""] + [f"- {n}" for n in fidelity_notes(config) if n.startswith("Boost calibration")]
    lines += ["", "## Audit verdicts", ""]
    lines += [f"- {k}: {v}" for k, v in audit.get("verdict_counts", {}).items()]
    lines += [""] + _exp4_lines(exp4_summary)
    lines += ["## Summaries", ""]
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
    write_json(
        Path(out_md).with_suffix(".json"),
        {"fidelity_notes": fidelity_notes(config), "fidelity": fidelity_table(config), "bundle": bundle_block},
    )


def _exp4_lines(summary: str | Path | None) -> list[str]:
    """exp4's report section from its summary table and transcripts (``esr.exp4``), or the one line saying it is
    off."""
    from esr.exp4 import report_section

    if summary is None:
        return report_section(None)
    import pandas as pd

    shown = Path(summary).with_name("transcripts.json")
    return report_section(pd.read_parquet(summary), read_json(shown)["transcripts"] if shown.is_file() else [])

"""Exp4's statistics and report section: the masked-ratio sweep, base vs fine-tuned (paper Sec 3.5, Fig 7;
reference protocol 6.9).

Per model (the base model and each fine-tuned model of ``finetune.masked_ratio_sweep``), from its exp1 (steered at the
calibrated threshold) and exp8 (same latents, prompts and seeds, no steering) trials, after the authors' inclusion
rules (``esr.metrics.include_trials``):

* ESR rate (#ESR / N), multi-attempt rate and improvement rate (#ESR / #multi-attempt) of the steered trials;
* the **unsteered restart rate**: the multi-attempt rate of the exp8 trials, i.e. how often the model restarts
  without any steering. Fine-tuning on self-correction examples can teach the restart phrases without teaching when
  to use them (``exp4-feasibility.md``: 0/48 -> 11/48 unsteered restarts); a steered ESR rate is evidence of
  steering resistance only when it clearly exceeds this rate;
* the **gate** (:func:`gate`): the steered ESR rate's Wilson lower bound is above the unsteered restart rate's Wilson
  upper bound (both 95%, ``esr.metrics.wilson_interval``). ``None`` when either has no trials.

Every rate carries its count (k, n) and its Wilson interval. The paper reports ESR and improvement rates per ratio
without intervals and without an unsteered gate; both are ours (the gate is the issue's acceptance criterion).

**Same prompts on both sides.** A fine-tuned model's trials use only its held-out evaluation prompts (its
finetune_data manifest's ``eval_prompts``; every ratio shares one split). The base model's own DAG keeps every prompt
(its exp1-exp10 results are the paper's), but its rows here count only its trials on those evaluation prompts
(``prompt_set`` ``held_out``), so base and fine-tuned are compared on the same prompts. With
``finetune.train_on_eval_prompts: true`` (the authors) the evaluation prompts are all prompts and nothing is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from esr.metrics import Proportion, include_trials

#: The gate's rule, as printed beside every gate verdict.
GATE_RULE = "steered ESR rate's 95% Wilson lower bound > unsteered restart rate's 95% Wilson upper bound"
#: The rate columns of the summary table, each with ``_k``, ``_n``, ``_rate``, ``_lo``, ``_hi``.
RATES = ("esr", "multi", "improvement", "unsteered_restart")
#: Transcripts shown in the report section.
N_TRANSCRIPTS = 3


def gate(*, esr: Proportion, unsteered: Proportion | None, level: float = 0.95) -> bool | None:
    """Whether the steered ESR rate clearly exceeds the unsteered restart rate: ``esr``'s Wilson lower bound
    strictly above ``unsteered``'s Wilson upper bound (``level``, default 95%). ``None`` (no verdict) when either
    has n = 0 or ``unsteered`` is None (exp8 not run)."""
    if unsteered is None or esr.n == 0 or unsteered.n == 0:
        return None
    return bool(esr.wilson(level).lo > unsteered.wilson(level).hi)


def _rate(prefix: str, p: Proportion | None, level: float) -> dict[str, Any]:
    if p is None:
        return {f"{prefix}_k": None, f"{prefix}_n": None} | {f"{prefix}_{s}": math.nan for s in ("rate", "lo", "hi")}
    w = p.wilson(level)
    return {
        f"{prefix}_k": p.k,
        f"{prefix}_n": p.n,
        f"{prefix}_rate": p.estimate,
        f"{prefix}_lo": w.lo,
        f"{prefix}_hi": w.hi,
    }


def model_row(
    *,
    model: str,
    base_model: str | None,
    masked_ratio: float | None,
    steered: pd.DataFrame,
    unsteered: pd.DataFrame | None,
    level: float = 0.95,
    prompt_set: str = "all",
) -> dict[str, Any]:
    """One row of the exp4 table for one model from its graded exp1 (``steered``) and exp8 (``unsteered``; None:
    not run) trials tables (``esr.trials``): ``model``, ``role`` (``base`` | ``finetuned``), ``base_model``,
    ``masked_ratio`` (NaN for the base), ``prompt_set`` (``held_out``: the trials are the held-out evaluation
    prompts' | ``all``), ``n_prompts`` (distinct prompts of the steered trials), for each of :data:`RATES`
    ``<rate>_k``, ``_n``, ``_rate``, ``_lo``, ``_hi`` (Wilson at ``level``), ``gate`` (:func:`gate`; None: no
    verdict)."""
    inc, _ = include_trials(steered)
    multi, esr = int(inc["multi"].sum()), int(inc["esr"].sum())
    esr_p = Proportion(esr, len(inc))
    restart = None
    if unsteered is not None:
        uinc, _ = include_trials(unsteered)
        restart = Proportion(int(uinc["multi"].sum()), len(uinc))
    row: dict[str, Any] = {
        "model": model,
        "role": "base" if base_model is None else "finetuned",
        "base_model": base_model or model,
        "masked_ratio": math.nan if masked_ratio is None else float(masked_ratio),
        "prompt_set": prompt_set,
        "n_prompts": int(inc["prompt_id"].nunique()) if len(inc) else 0,
    }
    row |= _rate("esr", esr_p, level) | _rate("multi", Proportion(multi, len(inc)), level)
    row |= _rate("improvement", Proportion(esr, multi), level) | _rate("unsteered_restart", restart, level)
    row["gate"] = gate(esr=esr_p, unsteered=restart, level=level)
    return row


def base_eval_prompts(
    models: Mapping[str, Mapping[str, Any]], eval_prompts: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Each base model's evaluation prompts: those of its fine-tuned models (``eval_prompts``: fine-tuned model ->
    its finetune_data manifest's ``eval_prompts``). Raises ``ValueError`` when two fine-tunes of one base were
    evaluated on different prompts (their base row would have no one set of prompts to be compared on)."""
    out: dict[str, list[str]] = {}
    for name, m in models.items():
        base = m.get("base_model")
        if base is None or name not in eval_prompts:
            continue
        prompts = sorted(eval_prompts[name])
        if base in out and out[base] != prompts:
            raise ValueError(
                f"exp4: the fine-tunes of {base!r} were evaluated on different prompts ({name!r} differs); "
                "rerun finetune_material and finetune_data"
            )
        out[base] = prompts
    return out


def _on_prompts(trials: pd.DataFrame | None, prompts: set[str]) -> pd.DataFrame | None:
    return None if trials is None else trials[trials["prompt"].isin(prompts)]


def summary_table(
    *,
    steered: Mapping[str, pd.DataFrame],
    unsteered: Mapping[str, pd.DataFrame] | None,
    models: Mapping[str, Mapping[str, Any]],
    level: float = 0.95,
    eval_prompts: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """The exp4 table, one row per model of ``models`` (name -> ``{"base_model": ..., "masked_ratio": ...}``, both
    None for a base model): bases first, then fine-tuned models by masked ratio. ``steered`` / ``unsteered``: model
    -> its graded exp1 / exp8 trials (``unsteered`` None: exp8 not run, no gate). ``eval_prompts``: fine-tuned model
    -> its evaluation prompts (finetune_data manifest); given, each base row counts only the base model's trials on
    its fine-tunes' evaluation prompts (:func:`base_eval_prompts`; ``prompt_set`` ``held_out``) and each fine-tuned
    row is checked to hold only its own. Raises ``KeyError`` naming a model without steered trials, ``ValueError``
    naming a fine-tuned model with a trial on a prompt outside its evaluation prompts (a training prompt)."""
    eval_prompts = dict(eval_prompts or {})
    bases = base_eval_prompts(models, eval_prompts)
    rows = []
    for name, m in models.items():
        if name not in steered:
            raise KeyError(f"exp4: no exp1 trials for model {name!r}")
        s, u = steered[name], None if unsteered is None else unsteered.get(name)
        prompt_set = "all"
        if name in eval_prompts:
            keep = set(eval_prompts[name])
            outside = sorted(set(s["prompt"]).union(set(u["prompt"]) if u is not None else set()) - keep)
            if outside:
                raise ValueError(
                    f"exp4: {len(outside)} prompt(s) of model {name!r}'s trials are not among its evaluation prompts "
                    f"(e.g. {outside[0]!r}): its trials must use only the held-out prompts"
                )
            prompt_set = "held_out"
        elif name in bases:
            keep = set(bases[name])
            s, u, prompt_set = _on_prompts(s, keep), _on_prompts(u, keep), "held_out"
        rows.append(
            model_row(
                model=name,
                base_model=m.get("base_model"),
                masked_ratio=m.get("masked_ratio"),
                steered=s,
                unsteered=u,
                level=level,
                prompt_set=prompt_set,
            )
        )
    table = pd.DataFrame(rows)
    order = table["role"].map({"base": 0, "finetuned": 1})
    return table.assign(_o=order).sort_values(["_o", "masked_ratio", "model"]).drop(columns="_o").reset_index(drop=True)


def transcripts(trials: pd.DataFrame, *, n: int = N_TRANSCRIPTS) -> list[dict[str, Any]]:
    """Up to ``n`` multi-attempt steered trials of fine-tuned models to show: taken in turn from each model (models
    with the highest ESR rate first), within a model ESR trials first, largest last - first score gain first.
    Each: ``model``, ``trial_id``, ``prompt``, ``label``, ``boost``, ``attempts`` (the judge's attempt texts; attempt
    2 starts at the restart) and ``scores``."""
    inc, _ = include_trials(trials)
    if not len(inc):
        return []
    rate = inc.groupby("model")["esr"].mean()
    multi = inc[inc["multi"]].assign(_not_esr=lambda d: ~d["esr"], _rate=lambda d: -d["model"].map(rate))
    multi = multi.sort_values(["_not_esr", "delta", "trial_id"], ascending=[True, False, True])
    multi = multi.assign(_turn=multi.groupby("model").cumcount())
    picked = multi.sort_values(["_turn", "_rate", "model"], kind="stable").head(n)
    return [
        {
            "model": r["model"],
            "trial_id": r["trial_id"],
            "prompt": r["prompt"],
            "label": r["label"],
            "boost": float(r["boost"]),
            "attempts": [str(t) for t in r["attempt_texts"]],
            "scores": [None if s is None or s != s else float(s) for s in r["attempt_scores"]],
        }
        for _, r in picked.iterrows()
    ]


def _fmt(row: Mapping[str, Any], prefix: str) -> str:
    k, n = row.get(f"{prefix}_k"), row.get(f"{prefix}_n")
    if k is None or n is None or (isinstance(n, float) and math.isnan(n)) or int(n) == 0:
        return "-"
    return f"{row[f'{prefix}_rate']:.1%} [{row[f'{prefix}_lo']:.1%}, {row[f'{prefix}_hi']:.1%}] ({int(k)}/{int(n)})"


def _verdict(g: Any) -> str:
    return {True: "passes", False: "**fails**"}.get(None if g is None or g != g else bool(g), "no verdict")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_section(table: pd.DataFrame | None, shown: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The report's exp4 section (markdown lines). ``table``: :func:`summary_table`'s output, or None when exp4 is
    off (one line says so). Base and fine-tuned models side by side: ESR, multi-attempt and improvement rates with
    Wilson intervals, the unsteered restart rate and the gate verdict beside them; then ``shown``
    (:func:`transcripts`) with the restart (the boundary between attempts) highlighted. The title says
    EXPERIMENTAL while no fine-tuned model passes the gate."""
    title = "## Exp4: fine-tuning that induces ESR (masked-ratio sweep)"
    if table is None:
        return [title, "", "Exp4 is off in this run (`finetune.enabled: false`): no fine-tuned model was trained.", ""]
    ft = table[table["role"] == "finetuned"]
    passing = [m for m, g in zip(ft["model"], ft["gate"]) if g is True or g == True]  # noqa: E712 (numpy bools)
    if not passing:
        title += " - EXPERIMENTAL: no fine-tuned model passes the gate"
    lines = [title, "", f"Gate: {GATE_RULE}.", ""]
    if "prompt_set" in table and (table["prompt_set"] == "held_out").any():
        lines += [
            "Every row counts trials on the fine-tuned models' held-out evaluation prompts only (never trained on): "
            "the base model's rows are its trials on those same prompts (its own results use every prompt).",
            "",
        ]
    head = ["model", "masked ratio", "prompts", "ESR rate", "multi-attempt rate", "improvement rate"]
    head += ["unsteered restart rate", "gate"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        ratio = "base" if r["role"] == "base" else f"{r['masked_ratio']:.2f}"
        held = " held-out" if r.get("prompt_set") == "held_out" else ""
        cells = [r["model"], ratio, f"{r['n_prompts']}{held}", _fmt(r, "esr"), _fmt(r, "multi"), _fmt(r, "improvement")]
        cells += [_fmt(r, "unsteered_restart"), _verdict(r["gate"])]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", f"Fine-tuned models passing the gate: {', '.join(passing) if passing else 'none'}.", ""]
    if not shown:
        lines += ["No multi-attempt steered answer of a fine-tuned model to show.", ""]
    for i, t in enumerate(shown, 1):
        lines += [
            f"**Transcript {i}** ({t['model']}, latent '{t['label']}', boost {t['boost']:.3g}): {t['prompt']}",
            "",
        ]
        for j, (text, score) in enumerate(zip(t["attempts"], t["scores"])):
            s = "unscored" if score is None else f"score {score:.0f}"
            if j:
                lines += ["> **>>> RESTART >>>**", ">"]
            lines += [f"> attempt {j + 1} ({s}): {_cell(text)}", ">"]
        lines[-1] = ""
    return lines


__all__ = [
    "GATE_RULE",
    "N_TRANSCRIPTS",
    "RATES",
    "base_eval_prompts",
    "gate",
    "model_row",
    "report_section",
    "summary_table",
    "transcripts",
]

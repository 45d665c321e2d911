"""Rules of ``workflow/rules/stats.smk``: the cross-judge regrade (exp7), the per-token activation analysis around
self-corrections (exp9), summaries and comparisons of every experiment, figures, and the audit of every paper
number."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esr.activations import ActivationRecord, open_store, write_store
from esr.config import ModelSpec
from esr.detectors import read_detector_sets
from esr.episodes import make_episode, select_baseline, select_self_correction
from esr.experiments import REGISTRY, capture_latents
from esr.io import derive_seed, write_json
from esr.judge import build_judge
from esr.metrics import BootstrapSpec, include_trials
from esr.progress import Progress
from esr.provenance import provenance
from esr.ranks import is_writer
from esr.sequential import (
    aligned_window,
    analyze,
    correction_starts,
    plot_aligned_window,
    plot_region_bars,
    summary_cell,
    token_group_series,
    write_analysis,
)
from esr.stages import model_stage
from esr.stats import cross_model_comparison, holm, specificity_comparison
from esr.summaries import compare_experiments, summarise_cross_judge, summarise_experiment, with_cells
from esr.trials import grade_trials, read_trials, write_trials

# Model code (torch, ~1-2 s), figures (matplotlib) and the audit (scipy.ndimage, jinja2) are imported inside the
# stages that use them: the CPU-only rules of this module start without them (tests/test_imports.py).
log = logging.getLogger("esr.stages.stats")


# ------------------------------------------------------------------------------------------------ exp7


def cross_judge(*, trials: str, judges: dict[str, dict[str, Any]], n_samples: int, seed: int, regraded: str) -> None:
    """exp7: regrade a sample of exp1 trials with other judges: every trial the original judge called
    multi-attempt plus a seeded random fill to ``n_samples`` (so per-judge rates are NOT population rates;
    agreement is the point). Each row keeps the original ``trial_id``; ``judge_id`` names the judge (the original
    is ``original``)."""
    df = read_trials(trials)
    ok = df[df.error.isna() & (df.response.str.len() > 0)] if len(df) else df
    multi = ok[ok.n_attempts >= 2]
    rest = ok.drop(multi.index)
    n_fill = max(0, n_samples - len(multi))
    fill = rest.sample(n=min(n_fill, len(rest)), random_state=derive_seed(seed, "cross_judge")) if len(rest) else rest
    sample = pd.concat([multi, fill]).sort_values("trial_id")
    reasons = np.where(sample.n_attempts >= 2, "multi", "fill")
    frames = [sample.assign(judge_id="original", sample_reason=reasons)]
    for name, cfg in judges.items():
        judge = build_judge(cfg, show_progress=False)
        frames.append(
            grade_trials(sample, judge).assign(judge_id=name, judge_model=judge.judge_id, sample_reason=reasons)
        )
        log.info("cross-judge %s (%s): %s", name, judge.judge_id, judge.stats.as_dict())
    out = pd.concat(frames, ignore_index=True).assign(experiment="exp7")
    write_trials(regraded, out, "graded", unique=("trial_id", "judge_id"))  # one row per (trial, judge)


# ------------------------------------------------------------------------------------------------ exp9


@model_stage
def sequential(
    *,
    spec: ModelSpec,
    model_dir: str,
    trials: list[str],
    baseline: str,
    detectors: str,
    settings: dict[str, Any],
    seed: int,
    store: str,
    baseline_store: str,
    analysis: str,
    summary: str,
    window: str,
    regions: str,
) -> None:
    """exp9 (paper Sec. 3.6, App. A.4): self-correction episodes (exactly two attempts, last > first) located in tokens by
    restart-phrase alignment, replayed through the model (unsteered by default, as the authors' exp9;
    ``replay_steering`` for their exp6's steered replay), per-token activations of every detector and control set
    stored in Zarr, then the region analysis, ratios to unsteered baseline answers, and the aligned +/-150-token
    window in 50 bins."""
    from esr.figures import empty_figure
    from esr.models import load_model
    from esr.readout import answer_token_spans, per_token_latents
    from esr.sae import load_sae, steering_directions
    from esr.steering import Intervention, SteeringPlan

    store_latents, groups = capture_latents(read_detector_sets(detectors))
    groups = {k: v for k, v in groups.items() if v}
    pool = read_trials(trials).to_dict("records")
    episodes_src = select_self_correction(pool, exclude_ablation=True)
    baseline_source = settings.get("baseline_source", "unsteered")
    if settings.get("boundary_source", "restart_phrase") != "restart_phrase":
        raise ValueError(f"sequential.boundary_source {settings['boundary_source']!r}: only 'restart_phrase' is built")
    # unsteered: exp8's answers (ours); steered_on_topic: exp1 answers that stayed on topic (the authors' baseline)
    baseline_pool = read_trials(baseline) if baseline_source == "unsteered" else read_trials(trials)
    baseline_src = select_baseline(
        baseline_pool.to_dict("records"), source=baseline_source, n=settings["n_baseline"], seed=seed
    )
    prov = provenance(sequential=settings, model=spec.name, sae=spec.sae.ident, seed=seed)
    if not episodes_src or not store_latents:
        if not is_writer():
            return
        log.warning(
            "no self-correction episodes (%d) or no detector latents (%d): exp9 has nothing to analyse",
            len(episodes_src),
            len(store_latents),
        )
        write_json(
            analysis,
            {
                "n_episodes": len(episodes_src),
                "n_baseline": len(baseline_src),
                "baseline_source": baseline_source,
                "skipped": True,
                "provenance": prov,
            },
        )
        write_json(summary, {"schema": "esr.summary/1", "provenance": prov, "cells": []})
        for f in (window, regions):
            empty_figure(f, "no self-correction episodes")
        for s in (store, baseline_store):
            Path(s).mkdir(parents=True, exist_ok=True)
        return
    loaded = load_model(spec, path=model_dir)
    sae = load_sae(spec.sae, device=loaded.device)
    tok = loaded.tokenizer
    plan = SteeringPlan(spec.injection_layer, spec.sae_layer)
    directions = steering_directions(spec, sae) if settings["replay_steering"] else None

    def replay(rows, kind):
        records, skipped = [], 0
        meter = Progress(total=len(rows), desc=f"replaying {kind}s", unit=f"{kind}s")
        for k, t in enumerate(rows):
            if k:
                meter.update(1)
            ids, spans, first, stop, text = answer_token_spans(tok, t["prompt"], t["response"])
            if kind == "episode":
                ep = make_episode({**t, "response": text}, f"ep_{k:04d}", method="restart_phrase", spans=spans)
                if ep is None or ep.tokens is None:
                    skipped += 1
                    continue
                labels = ep.tokens.region_labels()
            else:
                labels = ["baseline"] * (stop - first)
            iv = (
                [Intervention(steer_latent=t["latent"], boost=float(t["boost"]))]
                if directions is not None and kind == "episode"
                else None
            )
            acts = per_token_latents(
                loaded,
                sae,
                spec.sae_layer,
                [ids],
                store_latents,
                interventions=iv,
                directions=directions,
                plan=plan if iv else None,
                log_progress=False,
            )[0][first:stop]
            records.append(
                ActivationRecord(t["trial_id"], acts.numpy(), [tok.decode([i]) for i in ids[first:stop]], labels)
            )
        if rows:
            meter.update(1)
        return records, skipped

    ep_records, n_skipped = replay(episodes_src, "episode")
    base_records, _ = replay(baseline_src, "baseline")
    if not is_writer():  # tensor parallel: the replay is done; the writer stores and analyses
        return
    meta = {
        **prov,
        "replay": "steered" if directions is not None else "unsteered",
        "boundaries": "restart-phrase alignment",
        "baseline_source": {"unsteered": "unsteered (exp8 answers)"}.get(
            baseline_source, "steered on-topic single-attempt answers (the authors')"
        ),
    }
    write_store(
        store, ep_records, store_latents, latent_groups=groups, dtype="float32", provenance=meta, overwrite=True
    )
    write_store(
        baseline_store,
        base_records,
        store_latents,
        latent_groups=groups,
        dtype="float32",
        provenance=meta,
        overwrite=True,
    )
    sc_ds, base_ds = open_store(store), open_store(baseline_store)
    result = analyze(sc_ds, base_ds, groups, seed=seed, n_boot=settings["n_boot"], baseline_source=baseline_source)
    result["n_episodes_without_boundaries"] = n_skipped
    result["planted_episodes"] = sum(1 for t in episodes_src if t.get("experiment") == "planted")
    write_analysis(analysis, result, meta)
    anchors, n_valid = correction_starts(sc_ds), np.asarray(sc_ds.n_tokens.values)
    windows = {name: aligned_window(token_group_series(sc_ds, lat), anchors, n_valid) for name, lat in groups.items()}
    plot_aligned_window(
        windows, window, title=f"{spec.name}: detector activation around the correction", provenance=meta
    )
    primary = (
        settings["primary_group"] if settings["primary_group"] in result["groups"] else next(iter(result["groups"]))
    )
    plot_region_bars(
        result["groups"][primary]["regions"],
        regions,
        title=f"{spec.name}: {primary} mean activation by region",
        provenance=meta,
    )
    write_json(
        summary, {"schema": "esr.summary/1", "provenance": meta, "cells": [summary_cell(spec.name, primary, result)]}
    )


# ------------------------------------------------------------------------------------------------ summaries


SUMMARISERS = {
    "trials": lambda trials, summary, n_boot, seed: summarise_experiment([trials], summary, n_boot=n_boot, seed=seed),
    "cross_judge": lambda trials, summary, n_boot, seed: summarise_cross_judge([trials], summary),
}


def summarise(*, experiment: str, trials: str, n_boot: int, seed: int, summary: str) -> None:
    """The ``esr.summary/1`` cells of one experiment's trials table (rates with Wald, Wilson and latent-clustered
    bootstrap intervals; mean scores), summarised as its registry entry says (``esr.experiments.REGISTRY``)."""
    SUMMARISERS[REGISTRY[experiment].summary](trials, summary, n_boot, seed)


def compare(*, model: str, seed: int, comparisons: str, **trials: str) -> None:
    """exp1's baseline cell vs every cell of each experiment registered with ``compare`` (paired McNemar, Fisher,
    relative changes, Holm per model). ``trials``: experiment name -> table. The size trend needs every model's
    trials: rule ``cross_model`` (:func:`cross_model`) tests it."""
    others = [name for name in trials if name != "exp1" and REGISTRY[name].compare]
    compare_experiments(list(trials.values()), comparisons, others=others, seed=seed)


def _included(paths: str | list[str]) -> pd.DataFrame:
    inc, _ = include_trials(with_cells(read_trials(paths)))
    return inc


def cross_model(*, trials: list[str], n_params: dict[str, float], comparison: str) -> None:
    """The paper's headline across models (Sec. 3.1): do larger models resist more? Over every model's included exp1
    trials, the trend of the ESR and multi-attempt rates on ln(parameter count) (logistic regression, SEs clustered
    by (model, latent)) and every pair of models (Holm-adjusted); ``esr.stats.cross_model_comparison``. With fewer
    than two models the JSON says ``status: not_run`` and why (the workflow plans this rule only for >= 2 models)."""
    result = cross_model_comparison(_included(trials), n_params)
    if result["status"] != "ok":
        log.warning("cross-model comparison not run: %s", result["reason"])
    write_json(
        comparison,
        {"schema": "esr.cross_model/1", **result, "provenance": provenance(inputs=list(trials), n_params=n_params)},
    )


def specificity(*, model: str, detector_trials: str, control_trials: str, seed: int, comparison: str) -> None:
    """exp3 vs exp10 (paper Sec. 3.4, App. A.3.3): each ablated detector set against the random controls matched to
    it (exp10 cells ``random_<set>_<i>``), paired on latent, prompt and seed (``esr.stats.specificity_comparison``),
    one Holm family per model. Differences are detector ablation minus random ablation."""
    det, ctl = _included(detector_trials), _included(control_trials)
    spec = BootstrapSpec(2000, seed)
    families, pvals, notes = [], {}, []
    for set_name, d in det.groupby("ablation_set", sort=True) if len(det) else []:
        prefix = f"random_{set_name}_"
        matched = {
            name: g
            for name, g in (ctl.groupby("ablation_set", sort=True) if len(ctl) else [])
            if name.startswith(prefix) and name[len(prefix) :].isdigit()
        }
        if not matched:
            notes.append(f"{set_name}: no exp10 control matched to it")
            continue
        fam = specificity_comparison(d, matched, label=str(set_name), bootstrap=spec)
        pvals.update(fam["pvalues"])
        families.append(fam)
    adj = holm(pvals)
    write_json(
        comparison,
        {
            "schema": "esr.specificity/1",
            "model": model,
            "contrast": "exp3 (detector ablation) minus exp10 (matched random ablation), paired on latent, prompt, seed",
            "comparisons": families,
            "holm": {k: asdict(v) for k, v in adj.items()},
            "multiple_comparisons": f"Holm over the {len(adj)} latent-clustered sign-flip p-values of this model",
            "notes": notes,
            "provenance": provenance(inputs=[detector_trials, control_trials]),
        },
    )


def model_figures(*, model: str, ablation: str, meta_prompts: str, boost_sweep: str, **trials: str) -> None:
    """Figures 3-5 analogues of one model: ablation (exp3, exp10 vs exp1), meta-prompts (exp5), boost sweep (exp2).
    ``trials``: experiment name -> table, for exp1 and the experiments registered with a ``figure``."""
    from esr.figures import ablation_figure, meta_prompt_figure, sweep_figure

    by_figure: dict[str, dict[str, str]] = {}
    for name, path in trials.items():
        if REGISTRY[name].figure:
            by_figure.setdefault(REGISTRY[name].figure, {})[name] = path
    ablation_figure(model, trials["exp1"], by_figure.get("ablation", {}), ablation)
    meta_prompt_figure(
        model, trials["exp1"], next(iter(by_figure.get("meta_prompts", {}).values()), None), meta_prompts
    )
    sweep_figure(model, next(iter(by_figure.get("boost_sweep", {}).values()), None), boost_sweep)


def esr_figure(*, trials: list[str], order: list[str], figure: str) -> None:
    """Figure 2 analogue: ESR and multi-attempt rates of exp1 across models, with Wilson intervals."""
    from esr.figures import esr_by_model_figure

    esr_by_model_figure(trials, figure, order)


def audit(
    *,
    summaries: list[str],
    config: dict[str, Any],
    model_map: dict[str, str],
    table_json: str,
    table_md: str,
    table_html: str,
    overview: str,
    exp4: str | list[str] | None = None,
) -> None:
    """The audit of every paper number (``esr/data/paper_numbers.yaml``): paper value, ours, interval, n and
    verdict, as JSON, Markdown and HTML, plus the report's overview page (with exp4's section when ``exp4``, the
    sweep's summary table, is given)."""
    from esr import audit as paper_audit
    from esr import bundle
    from esr.report import run_overview

    paper_audit.build_audit(
        summaries, out_json=table_json, out_md=table_md, out_html=table_html, config=config, model_map=model_map
    )
    imported = Path(bundle.MANIFEST).is_file()  # a results bundle imported into this working directory
    exp4 = (exp4[0] if exp4 else None) if isinstance(exp4, list) else exp4
    run_overview(
        config, summaries, table_json, overview, bundle_root=Path.cwd() if imported else None, exp4_summary=exp4
    )

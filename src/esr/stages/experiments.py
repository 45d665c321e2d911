"""Rules of ``workflow/rules/experiments.smk``: the experiment DAG of one model.

latent selection -> detector discovery (unsteered answers) -> judge anchors -> boost calibration (sharded by latent)
-> generation per (experiment, condition, latent shard) -> grading (a separate rule, so a judge change reruns
grading and statistics only) -> one trials table per experiment. Which experiments and conditions run, and how their
trials are planned, comes from ``esr.experiments.REGISTRY``.

The model, SAE and judge are loaded once per job. Long stages checkpoint their progress (generation in per-batch
files next to the output, grading and calibration in content-addressed caches), so a killed job resumes without
redoing finished work. Model stages (:func:`esr.stages.model_stage`) run as tensor-parallel ranks for models with
``tensor_parallel`` > 1; only the writer rank calls the judge and writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from esr.activations import gather_stores, record_from_capture, write_store
from esr.assets import read_prompts
from esr.calibration import (
    BoostPrior,
    CalibrationCache,
    CalibrationContext,
    calibration_table,
    make_keys,
    model_key_settings,
    model_settings,
    read_shard_results,
    read_thresholds,
    run_calibration_shard,
    sample_plan,
    summarize_thresholds,
    weights_fingerprint,
    write_table,
)
from esr.config import ModelSpec
from esr.detectors import (
    PAPER_SETS,
    control_statistics,
    derangement,
    frequency_detectors,
    match_quality,
    matched_random_sets,
    random_set_name,
    read_detector_sets,
    separability_detectors,
    top_auc_detectors,
)
from esr.experiments import REGISTRY, PlanInputs, capture_latents, latent_plans, plan, shard_of, shard_trials
from esr.generation import GenerationResult, TrialRequest, load_configured_generator
from esr.io import atomic_path, derive_seed, read_json, stable_hash, write_json, write_parquet
from esr.judge import JudgeRequest, build_concreteness_grader, build_judge, fit_anchors
from esr.latents import firing_frequency, model_selection_settings, read_labels, read_selection, write_selection
from esr.latents import select_latents as _select
from esr.models import load_model
from esr.progress import Progress
from esr.provenance import provenance
from esr.ranks import from_writer, is_writer, share
from esr.readout import conversation_ids, max_pooled_latents, prompt_relevance_activations
from esr.sae import load_sae
from esr.stages import model_stage
from esr.steering import Intervention
from esr.trials import TrialSpec, columns, empty_frame, grade_trials, read_trials, write_trials

log = logging.getLogger("esr.stages.experiments")


# ------------------------------------------------------------------------------------------------ selection


def prompt_pool(prompt_list: Sequence[str], finetune_manifest: str | Sequence[str] | None) -> list[int] | None:
    """The prompt ids (indices into ``prompt_list``) a model's stages may use: None (every prompt) for a model
    without a finetune_data manifest; for a fine-tuned model (exp4; the rule's ``finetune_manifest`` input, a path
    or a one-element list) the manifest's evaluation prompts (held out from training unless
    ``finetune.train_on_eval_prompts``; ``esr.finetune.eval_prompt_ids``). Selection, detector discovery, the judge's
    anchors and boost calibration of a fine-tuned model all read this pool, and every experiment replays the
    selection's prompts, so no stage of a fine-tuned model sees a prompt it was trained on. Raises ``ValueError``
    (from ``eval_prompt_ids``) when the manifest does not match the prompt list."""
    if not isinstance(finetune_manifest, str):
        finetune_manifest = finetune_manifest[0] if finetune_manifest else None
    if not finetune_manifest:
        return None
    from esr.finetune import eval_prompt_ids

    return eval_prompt_ids(manifest=read_json(finetune_manifest), prompts=prompt_list)


@model_stage
def select_latents(
    *,
    spec: ModelSpec,
    model_dir: str,
    prompts: str,
    labels: str,
    settings: dict[str, Any],
    concreteness: dict[str, Any],
    seed: int,
    selection: str,
    finetune_manifest: str | list[str] | None = None,
) -> None:
    """Sample the latents every experiment replays (paper Sec. 2.2): labelled, alive, not active on the prompts,
    concrete labels; each with its prompts and per-trial seeds. Writes ``selection.json``.

    ``finetune_manifest`` (exp4, a fine-tuned model: its finetune_data manifest): trial prompts are drawn from the
    manifest's evaluation prompts only (held out from training unless ``finetune.train_on_eval_prompts``;
    :func:`prompt_pool`), and the relevance filter reads those prompts only (the prompts the trials use, as the
    authors' filter read their 38 trial prompts)."""
    prompt_list = read_prompts(prompts)
    pool = prompt_pool(prompt_list, finetune_manifest)
    sel_settings = model_selection_settings(settings, spec.name, base_model=spec.base_model)
    loaded = load_model(spec, path=model_dir)
    sae = load_sae(spec.sae, device=loaded.device)
    d_sae = int(sae.cfg.d_sae)
    prompt_acts = (
        prompt_relevance_activations(
            loaded, sae, spec.sae_layer, prompt_list if pool is None else [prompt_list[i] for i in pool]
        )
        if sel_settings.relevance_filter != "none"
        else None
    )
    if not is_writer():  # tensor parallel: the model work is done; the writer grades labels and writes
        return
    label_table = read_labels(labels)
    freq = firing_frequency(label_table, d_sae) if "frequency" in label_table.columns else None
    grader = build_concreteness_grader(concreteness, show_progress=False)

    def grade(names: Sequence[str]) -> list[float | None]:
        return [None if (s.score is None or s.failed_closed) else float(s.score) for s in grader.grade_labels(names)]

    sel = _select(
        model=spec.name,
        seed=seed,
        settings=sel_settings,
        d_sae=d_sae,
        labels=label_table,
        grader=grade,
        prompt_acts=prompt_acts,
        n_prompts=len(prompt_list) if pool is None else len(pool),
        firing_freq=freq,
        progress=True,
    )
    if pool is not None:
        from esr.finetune import restrict_to_prompts

        sel = restrict_to_prompts(sel, pool)
        sel.n_prompts = len(prompt_list)
        log.info("trial prompts restricted to the %d evaluation prompts of %s", len(pool), finetune_manifest)
    log.info("selected %d latents; filter counts %s", len(sel.latents), sel.counts)
    write_selection(
        selection,
        sel,
        provenance(selection=settings, concreteness=grader.describe(), model=spec.name, sae=spec.sae.ident, seed=seed),
    )


# ------------------------------------------------------------------------------------------------ detectors


def _unsteered_answers(
    generator, prompts: list[str], seed: int, prompt_ids: Sequence[int] | None = None
) -> pd.DataFrame:
    """One seeded unsteered answer per prompt (detector discovery's "normal" pairs and the judge's anchors).
    ``prompt_ids``: the prompts' ids in the prompt list (default ``0..n-1``); seeds and ids follow them, so a model
    restricted to a prompt pool answers each prompt with the same seed as a model that sees every prompt."""
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    reqs = [
        TrialRequest(prompt=p, seed=derive_seed(seed, "normal", str(i)), trial_id=f"normal|P{i}")
        for i, p in zip(ids, prompts)
    ]
    return pd.DataFrame(
        [
            {"prompt_id": i, "prompt": r.prompt, "seed": r.seed, "response": r.response, "n_tokens": r.n_tokens}
            for i, r in zip(ids, generator.generate(reqs, desc="unsteered answers"))
        ]
    )


@model_stage
def discover_detectors(
    *,
    spec: ModelSpec,
    model_dir: str,
    prompts: str,
    generation: dict[str, Any],
    settings: dict[str, Any],
    seed: int,
    detectors: str,
    answers: str,
    ablated: list[str] | None = None,
    finetune_manifest: str | list[str] | None = None,
) -> None:
    """Off-topic-detector discovery (paper Sec. 2.3/3.4): the model's unsteered answer to every prompt, then the
    separability, frequency (and top-AUC) methods on own-answer vs deranged-answer conversations (on the evaluation
    prompts; no held-out split), each truncated to ``max_latents`` by its stated rank, then matched random control
    sets (exp10): one group of ``random_control.n_sets`` per set in ``random_control.match_to`` (``ablated``: the
    sets exp3 ablates, given by the rule as ``ablated``; every set found when that is not given). Writes ``detectors.json`` and the
    unsteered answers. ``finetune_manifest`` (exp4, a fine-tuned model): discovery and the unsteered answers (the
    judge's anchors) use its held-out evaluation prompts only (:func:`prompt_pool`); raises ``ValueError`` when
    that pool has fewer than 2 prompts (no derangement)."""
    all_prompts = read_prompts(prompts)
    pool = prompt_pool(all_prompts, finetune_manifest)
    pool_ids = list(range(len(all_prompts))) if pool is None else pool
    prompt_list = [all_prompts[i] for i in pool_ids]
    if len(prompt_list) < 2:
        raise ValueError(
            f"discover_detectors: {len(prompt_list)} evaluation prompt(s) for {spec.name}; discovery pairs each prompt "
            "with another prompt's answer (raise finetune.heldout_fraction)"
        )
    gen = load_configured_generator(spec, model_dir, generation)
    unsteered = share(_unsteered_answers(gen, prompt_list, seed, pool_ids))  # tensor parallel: rank 0's text
    if is_writer():
        write_parquet(answers, unsteered)
    tok, sae = gen.loaded.tokenizer, gen.directions.sae
    perm = derangement(len(prompt_list), derive_seed(seed, spec.name, "derangement"))
    normal_seqs = [conversation_ids(tok, p, unsteered.response[i])[0] for i, p in enumerate(prompt_list)]
    shuffled_seqs = [conversation_ids(tok, p, unsteered.response[perm[i]])[0] for i, p in enumerate(prompt_list)]
    normal = max_pooled_latents(gen.loaded, sae, spec.sae_layer, normal_seqs, desc="normal pairs")
    shuffled = max_pooled_latents(gen.loaded, sae, spec.sae_layer, shuffled_seqs, desc="shuffled pairs")
    if not is_writer():
        return
    alive = np.maximum(normal, shuffled).max(axis=0) > 0
    found = [
        separability_detectors(normal, shuffled, alive=alive, min_auc=settings.get("min_auc", 1.0)),
        frequency_detectors(normal, shuffled, settings["min_shuffled_rate"]),
    ]
    if settings.get("top_auc_k"):
        found.append(top_auc_detectors(normal, shuffled, settings["top_auc_k"], alive=alive))
    sets: dict[str, dict[str, Any]] = {}
    for ds in found:
        latents = ds.latents[: settings["max_latents"]]
        sets[ds.name] = {
            "method": ds.method,
            "latents": latents,
            "params": ds.params,
            "n_found": len(ds.latents),
            "truncated_by": ds.params.get("rank") if len(ds.latents) > len(latents) else None,
            "stats": {str(k): v for k, v in ds.stats.items() if k in latents},
        }
    for name in spec.paper_detector_sets:
        if max(PAPER_SETS[name]) >= sae.cfg.d_sae:
            raise ValueError(
                f"detectors.paper_sets names {name!r}, whose latent ids exceed this SAE's "
                f"{sae.cfg.d_sae} latents (the paper's sets belong to the 70B Goodfire SAE)"
            )
        sets[name] = {"method": "paper", "latents": list(PAPER_SETS[name])}
    controls, control_info = _random_controls(settings["random_control"], sets, normal, shuffled, ablated, seed, spec)
    write_json(
        detectors,
        {
            "model": spec.name,
            "n_prompts": len(prompt_list),
            "discovery_prompts": "evaluation" if pool is None else "held_out_evaluation",
            "prompt_ids": pool_ids,
            "derangement": perm.tolist(),
            "detector_sets": sets,
            "random_sets": controls,
            "random_control": control_info,
            "provenance": provenance(detectors=settings, model=spec.name, sae=spec.sae.ident, seed=seed),
        },
    )
    log.info(
        "detector sets: %s; random sets: %s",
        {k: len(v["latents"]) for k, v in sets.items()},
        {k: len(v["latents"]) for k, v in controls.items()},
    )


def _random_controls(
    rc: dict[str, Any],
    sets: dict[str, dict[str, Any]],
    normal: np.ndarray,
    shuffled: np.ndarray,
    ablated: list[str] | None,
    seed: int,
    spec: ModelSpec,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """exp10's control sets (``esr.detectors.matched_random_sets``), one group per matched set, and a summary of
    how they were drawn (``random_control`` in ``detectors.json``). Statistics come from the read-outs named by
    ``rc.stats_on``; every control avoids every detector set and the controls drawn before it."""
    stats_on = rc.get("stats_on", "all_pairs")
    readouts = np.concatenate([normal, shuffled]) if stats_on == "all_pairs" else normal
    freq, mean_act = control_statistics(readouts)
    match_to = rc.get("match_to", "ablated")
    if match_to == "ablated":
        targets = list(ablated) if ablated is not None else list(sets)
    else:
        targets = [match_to] if isinstance(match_to, str) else list(match_to)
    taken = {int(j) for v in sets.values() for j in v["latents"]}
    controls: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    disjoint = True
    for target in targets:
        if target not in sets or not sets[target]["latents"]:
            notes.append(f"detector set {target!r} is empty or absent: no random controls matched to it")
            log.warning("detector set %r is empty or absent: no random controls matched to it", target)
            continue
        drawn = matched_random_sets(
            sets[target]["latents"],
            freq,
            mean_act,
            n_sets=rc["n_sets"],
            seed=derive_seed(seed, spec.name, "random_control", target),
            candidates_per_latent=rc.get("candidates_per_latent", 100),
            avoid=taken,
        )
        for note in drawn.notes:
            notes.append(f"{target}: {note}")
            log.warning("random controls matched to %r: %s", target, note)
        disjoint &= drawn.disjoint
        for i, latents in enumerate(drawn.sets):
            taken |= set(latents)
            controls[random_set_name(target, i)] = {
                "method": "matched_random",
                "matched_to": target,
                "latents": latents,
                "disjoint": drawn.disjoint,
                "match": match_quality(sets[target]["latents"], latents, freq, mean_act),
            }
    info = {
        "stats_on": stats_on,
        "statistic": "firing frequency and mean activation when active, over max-pooled discovery read-outs",
        "match_to": targets,
        "n_sets": rc["n_sets"],
        "candidates_per_latent": rc.get("candidates_per_latent", 100),
        "n_live": int((freq > 0).sum()),
        "disjoint": bool(disjoint),
        "notes": notes,
    }
    return controls, info


def anchor_judge(*, answers: str, anchors: str) -> None:
    """Anchor the offline MiniLM judge on this model's own unsteered answers (on-topic: a prompt vs its own
    answer; off-topic: vs the other prompts' answers). Used where a judge block says ``anchors: auto``."""
    table = pd.read_parquet(answers)
    fitted = fit_anchors(list(table.prompt), list(table.response))
    fitted.save(anchors)
    log.info("offline judge anchors: %s", fitted)


# ------------------------------------------------------------------------------------------------ boost calibration


@model_stage
def calibrate_boosts(
    *,
    spec: ModelSpec,
    model_dir: str,
    prompts: str,
    selection: str,
    generation: dict[str, Any],
    settings: dict[str, Any],
    judge: dict[str, Any],
    seed: int,
    n_shards: int,
    shard: int,
    cache_dir: str,
    shard_result: str,
    finetune_manifest: str | list[str] | None = None,
) -> None:
    """Boost calibration of one latent shard (paper Sec. 2.2; algorithm in ``esr.calibration``): per latent, the
    boost (in the SAE's boost unit) at which the judge's mean first-attempt score reaches the target. Answers are
    scored by the ``threshold_judge`` block. Settings: the ``calibration`` block with the model's own
    ``models.<m>.calibration`` overrides (``esr.calibration.model_settings``). Results are cached under a key built
    from the generator and judge that run here (``CalibrationContext.from_run``): every resolved setting, the
    prompts included. ``finetune_manifest`` (exp4, a fine-tuned model): answers are drawn from its held-out
    evaluation prompts only (:func:`prompt_pool`)."""
    prompt_list = read_prompts(prompts)
    pool = prompt_pool(prompt_list, finetune_manifest)
    if pool is not None:
        prompt_list = [prompt_list[i] for i in pool]
        log.info("calibrating on the %d held-out evaluation prompts of %s", len(pool), spec.name)
    sel = read_selection(selection)
    cal = model_settings(settings, spec)
    if pool is not None and max(cal.samples_per_step, cal.check_samples) > len(pool):
        raise ValueError(
            f"calibrate_boosts: {spec.name} has {len(pool)} held-out evaluation prompts, fewer than "
            f"calibration.samples_per_step ({cal.samples_per_step}) or calibration.check_samples "
            f"({cal.check_samples}) (answers use distinct prompts): raise finetune.heldout_fraction"
        )
    labels = {s.latent: s.label or "" for s in sel.latents}
    latents = [lat for lat in labels if shard_of(lat, n_shards) == shard]
    scorer = build_judge(judge, show_progress=False)
    gen = load_configured_generator(spec, model_dir, generation, max_new_tokens=cal.max_new_tokens)
    context = CalibrationContext.from_run(
        spec=spec, generator=gen, judge_config=judge, judge=scorer, prompts=prompt_list, seed=seed, model_dir=model_dir
    )
    keys = make_keys(context, cal, BoostPrior.from_spec(spec), latents, labels)

    def score_batch(requests):
        reqs, owners = [], []
        for k, r in enumerate(requests):
            for pid, s in sample_plan(r, len(prompt_list)):
                reqs.append(
                    TrialRequest(
                        prompt=prompt_list[pid],
                        seed=s,
                        intervention=Intervention(steer_latent=r.latent, boost=float(r.boost)),
                    )
                )
                owners.append((k, pid))
        answers = gen.generate(reqs)

        def grade() -> list[float | None]:
            graded = scorer.grade_batch(
                [
                    JudgeRequest(prompt_list[pid], a.response, labels[requests[k].latent])
                    for (k, pid), a in zip(owners, answers)
                ],
                show_progress=False,
            )
            per: dict[int, list[float]] = {}
            for (k, _), g in zip(owners, graded):
                if g.ok and g.scores:
                    per.setdefault(k, []).append(g.scores[0] / 100.0)
            # a request whose answers all failed grading (or had no attempt) fails that latent, never loops forever
            return [float(np.mean(per[k])) if per.get(k) else None for k in range(len(requests))]

        return from_writer(grade)  # tensor parallel: the writer calls the judge, every rank steps the same search

    writer = is_writer()
    results = run_calibration_shard(
        keys,
        score_batch,
        CalibrationCache(cache_dir, read_only=not writer),
        batch_size=generation["batch_size"],
        progress=writer,
        out_path=shard_result if writer else None,
        provenance=provenance(
            calibration=dataclasses.asdict(cal),
            judge=scorer.describe(),
            model=spec.name,
            sae=spec.sae.ident,
            seed=seed,
            shard=shard,
            n_shards=n_shards,
        ),
    )
    if writer:
        log.info(
            "calibrated %d latents (%d failed); judge %s",
            len(results),
            sum(r.error is not None for r in results),
            scorer.stats.as_dict(),
        )


def gather_calibration(*, shards: list[str], thresholds: str, summary: str) -> None:
    """One thresholds table (``thresholds.parquet``) and its quantile summary from the calibration shards."""
    table = calibration_table([r for p in shards for r in read_shard_results(p)])
    write_table(table, thresholds)
    write_json(
        summary,
        {
            "summary": json.loads(summarize_thresholds(table).to_json(orient="records")),
            "n_latents": len(table),
            "provenance": provenance(),
        },
    )


# ------------------------------------------------------------------------------------------------ generation


def _request(t: TrialSpec, store_latents: Sequence[int]) -> TrialRequest:
    cap = tuple(sorted(set(store_latents) | ({t.latent} if t.latent is not None else set())))
    iv = Intervention(
        steer_latent=t.latent if t.steer else None,
        boost=t.boost if t.steer else 0.0,
        ablate=t.ablate,
        capture=cap if store_latents else (),
    )
    return TrialRequest(prompt=t.prompt, seed=t.seed, intervention=iv, trial_id=t.trial_id)


def _generated_row(t: TrialSpec, r: GenerationResult) -> dict[str, Any]:
    if r.trial_id != t.trial_id:
        raise RuntimeError(f"generation returned trial {r.trial_id!r} where {t.trial_id!r} was expected")
    return {
        **t.to_dict(),
        "response": r.response,
        "n_tokens": r.n_tokens,
        "finish_reason": r.finish_reason,
        "token_ids": list(r.token_ids),
        "boost_unit": r.steering.get("boost_unit"),
        "steer_coefficient": r.steering.get("steer_coefficient"),
        "steer_residual_norm": r.steering.get("steer_residual_norm"),
        "settings": json.dumps(r.settings, sort_keys=True, default=str),
    }


@model_stage
def generate(
    *,
    spec: ModelSpec,
    model_dir: str,
    prompts: str,
    selection: str,
    thresholds: str,
    detectors: str,
    generation: dict[str, Any],
    settings: dict[str, Any],
    experiment: str,
    condition: str,
    n_shards: int,
    shard: int,
    seed: int,
    trials: str,
    activations: str,
) -> None:
    """Generate one shard of one (experiment, condition): the plan from ``esr.experiments.REGISTRY``, in batches.

    Each finished batch is checkpointed in ``<trials>.partial/<plan hash>/`` so a killed job resumes where it
    stopped. Experiments registered with ``capture`` store the per-token SAE activations of every detector,
    control and selected latent in the Zarr store ``activations`` (others leave it an empty folder)."""
    sel, det = read_selection(selection), read_detector_sets(detectors)
    inputs = PlanInputs(spec.name, latent_plans(sel, read_thresholds(thresholds)), read_prompts(prompts), det, settings)
    planned = shard_trials(plan(experiment, condition, inputs), n_shards, shard)
    if not planned:
        log.warning(
            "%s/%s shard %d has no trials (empty latent set or no calibrated latent)", experiment, condition, shard
        )
    store_latents, groups = capture_latents(det, sel) if REGISTRY[experiment].capture else ([], {})
    run_provenance = provenance(
        generation=generation,
        experiments=settings,
        model=spec.name,
        sae=spec.sae.ident,
        revision=spec.revision,
        seed=seed,
        experiment=experiment,
        condition=condition,
        shard=shard,
    )
    out = Path(trials)
    plan_hash = checkpoint_key(planned, generation, spec, model_dir, store_latents)
    partial = out.with_name(out.name + ".partial") / plan_hash
    partial.mkdir(parents=True, exist_ok=True)
    done, acts = read_checkpoints(partial)  # read by every rank before the first batch: no writes yet
    todo = [t for t in planned if t.trial_id not in done]
    log.info("%d trials planned, %d already generated (resuming), %d to generate", len(planned), len(done), len(todo))
    settings_record: dict[str, Any] = {}
    writer = is_writer()
    if todo:
        gen = load_configured_generator(spec, model_dir, generation)
        settings_record = gen.settings_record()
        bs = generation["batch_size"]
        meter = Progress(total=len(todo), desc=f"generate {experiment}/{condition} shard {shard}", unit="trials")
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            results = gen.generate_batch([_request(t, store_latents) for t in chunk])
            rows = [_generated_row(t, r) for t, r in zip(chunk, results)]
            batch_acts = {t.trial_id: r.activations for t, r in zip(chunk, results) if r.activations is not None}
            if writer:
                with atomic_path(partial / f"batch-{start:06d}.pt") as tmp:  # a kill never leaves half a file
                    torch.save({"rows": rows, "acts": batch_acts}, tmp)
            done.update({row["trial_id"]: row for row in rows})
            acts.update(batch_acts)
            if writer:  # one line per batch (a checkpoint), counted in trials
                meter.update(len(chunk))
    if not writer:
        return
    table = pd.DataFrame([done[t.trial_id] for t in planned]) if planned else empty_frame("generated")
    table["provenance"] = json.dumps({**run_provenance, "generation": settings_record or None}, default=str)
    if store_latents:
        _write_activations(spec, model_dir, planned, done, acts, store_latents, groups, activations, run_provenance)
    else:
        Path(activations).mkdir(parents=True, exist_ok=True)
    write_trials(out, table[columns("generated")], "generated")
    shutil.rmtree(partial.parent, ignore_errors=True)


def checkpoint_key(
    planned: Sequence[TrialSpec],
    generation: dict[str, Any],
    spec: ModelSpec,
    model_dir: str,
    store_latents: Sequence[int],
) -> str:
    """The folder name of a generation shard's batch checkpoints (16 hex digits): a hash of the planned trials, the
    ``generation`` block, every model-entry setting (``esr.calibration.model_key_settings``: dtype, engine, layers,
    SAE, ...), the weights behind them (``weights_fingerprint``) and the captured latents, so a rerun under any
    other setting never resumes from these checkpoints."""
    return stable_hash(
        [t.to_dict() for t in planned]
        + [generation, model_key_settings(spec), weights_fingerprint(spec, model_dir), list(store_latents)]
    )[:16]


def read_checkpoints(partial: Path) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The generated rows and captured activations of the batch checkpoints in ``partial`` (trial id -> row, trial
    id -> activations). A checkpoint that cannot be read (a file cut short by a kill before checkpoints were written
    atomically, a full disk) is removed with a warning naming it; its trials are generated again."""
    done: dict[str, dict[str, Any]] = {}
    acts: dict[str, torch.Tensor] = {}
    for f in sorted(partial.glob("batch-*.pt")):
        try:
            blob = torch.load(f, weights_only=False)
        except Exception as err:  # any unreadable checkpoint is regenerated, never trusted
            log.warning("discarding unreadable generation checkpoint %s (%s: %s)", f, type(err).__name__, err)
            if is_writer():
                f.unlink(missing_ok=True)
            continue
        done.update({r["trial_id"]: r for r in blob["rows"]})
        acts.update(blob["acts"])
    return done, acts


def _write_activations(spec, model_dir, planned, rows, acts, store_latents, groups, path, run_provenance) -> None:
    from transformers import AutoTokenizer  # ~2 s: only here, not in the CPU-only rules of this module

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    records = []
    for t in planned:
        row = rows[t.trial_id]
        if t.trial_id not in acts or row["n_tokens"] == 0:
            continue
        cap = sorted(set(store_latents) | ({t.latent} if t.latent is not None else set()))
        texts = [tok.decode([i]) for i in row["token_ids"]]
        records.append(
            record_from_capture(t.trial_id, acts[t.trial_id], cap, store_latents, texts, steered_latent=t.latent)
        )
    if not records:
        raise ValueError(f"no activations were captured for {path}")
    write_store(
        path,
        records,
        store_latents,
        latent_groups=groups,
        dtype="float32",
        provenance={
            **run_provenance,
            "model": spec.name,
            "sae": spec.sae.ident,
            "layer": spec.sae_layer,
            "capture": "during generation (steered, as generated)",
        },
        overwrite=True,
    )


def plant_restarts(*, steered: str, unsteered: str, fraction: float, seed: int, trials: str) -> None:
    """POSITIVE CONTROL (embedded default only; SmolLM2 never restarts on its own): a seeded fraction of exp1's
    steered answers get an explicit restart phrase and the unsteered answer to the same prompt and seed appended,
    so the ESR metrics and statistics can be seen to fire. Labelled ``planted`` everywhere."""
    steered_table = read_trials(steered, "generated")
    base = read_trials(unsteered, "generated").set_index(["latent", "prompt_id", "seed"])
    rng = np.random.default_rng(derive_seed(seed, "planted"))
    pick = rng.random(len(steered_table)) < fraction
    rows = []
    for flag, r in zip(pick, steered_table.to_dict("records")):
        if not flag:
            continue
        answer = base.loc[(r["latent"], r["prompt_id"], r["seed"])]["response"]
        rows.append(
            {
                **r,
                "response": f"{r['response'].rstrip()} Wait, that's not right. Let me start over. {answer}",
                "experiment": "planted",
                "condition": "restart",
                "trial_id": r["trial_id"].replace("exp1|steered", "planted|restart"),
            }
        )
    write_trials(trials, pd.DataFrame(rows, columns=steered_table.columns), "generated")
    log.info("planted restarts into %d of %d steered answers", len(rows), len(steered_table))


# ------------------------------------------------------------------------------------------------ grading


def grade(*, generated: str, judge: dict[str, Any], trials: str, judge_stats: str) -> None:
    """Grade every generated answer of one shard with the ``judge`` block (paper Sec. 2.3): attempts and scores.

    A trial the judge could not grade keeps its error and ``error_kind`` (counted in ``judge_stats`` under
    ``error_kinds``; the statistics exclude it as a ``trial_error``, split by kind). Raises ``JudgeAuthError`` (the
    key was refused) and ``JudgeCircuitOpen`` (``max_consecutive_failures`` failures in a row): nothing is written
    then, and every answer already received is in the judge cache for the rerun."""
    table = read_trials(generated, "generated")
    grader = build_judge(judge, show_progress=True)
    out = grade_trials(table, grader)
    write_trials(trials, out, "graded")
    kinds = out["error_kind"][out["error"].notna()].fillna("unknown").value_counts()
    error_kinds = {str(k): int(v) for k, v in sorted(kinds.items())}
    write_json(
        judge_stats,
        {
            "judge": grader.describe(),
            "stats": grader.stats.as_dict(),
            "n_trials": len(out),
            "error_kinds": error_kinds,
            "provenance": provenance(judge=grader.describe()),
        },
    )
    log.info("graded %d answers: %s", len(out), grader.stats.as_dict())
    if error_kinds:
        log.warning(
            "%d of %d answers were not graded (by error kind: %s)", sum(error_kinds.values()), len(out), error_kinds
        )


def gather_trials(*, shards: list[str], trials: str) -> None:
    """One trials table per experiment and model from its graded shards (duplicate trial ids are an error)."""
    write_trials(trials, read_trials(shards, "graded"), "graded")


def gather_activations(*, shards: list[str], store: str) -> None:
    """One per-token activation store (Zarr) per model from exp1's generation shards."""
    gather_stores(shards, store, overwrite=True)

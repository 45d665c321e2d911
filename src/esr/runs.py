"""Experiment stages: one function per Snakemake rule body of the experiment DAG (selection, detector discovery,
judge calibration, boost calibration, generation, grading, gathering). Plans come from ``esr.experiments``; the
model, SAE and judge are loaded once per job. Outputs are written atomically; long stages checkpoint their progress
(generation in per-batch files next to the output, grading and calibration in content-addressed caches) so a
killed job resumes without redoing finished work."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from esr.config import ModelSpec
from esr.distributed import from_writer, is_writer, share
from esr.experiments import TrialSpec
from esr.io import read_json, stable_hash, write_json, write_parquet
from esr.provenance import provenance
from esr.records import Intervention

log = logging.getLogger("esr.runs")


# ------------------------------------------------------------------------------------------------ loading

def load_generator_for(spec: ModelSpec, model_dir: str | Path, gen_cfg: dict[str, Any], max_new_tokens: int | None = None):
    """The model, its SAE and steering directions, wrapped as a ``SteeredGenerator`` with the config's settings."""
    from esr.generation import load_generator

    return load_generator(spec, model_dir=str(model_dir), temperature=gen_cfg["temperature"],
                          max_new_tokens=max_new_tokens or gen_cfg["max_new_tokens"],
                          batch_size=gen_cfg["batch_size"], positions=gen_cfg["steer_positions"], progress=False)


def read_prompt_list(path: str | Path) -> list[str]:
    from esr.assets import read_prompts

    return read_prompts(path)


def concreteness_callable(grader):
    """Adapt a judge concreteness grader to the selection's ``labels -> scores (None on failure)`` interface."""
    def grade(labels: Sequence[str]) -> list[float | None]:
        return [None if (s.score is None or s.failed_closed) else float(s.score) for s in grader.grade_labels(labels)]
    return grade


# ------------------------------------------------------------------------------------------------ selection

def select_latents_stage(spec: ModelSpec, model_dir: str | Path, prompts_path: str | Path, labels_csv: str | Path,
                         selection_cfg: dict[str, Any], concreteness_cfg: dict[str, Any], seed: int,
                         out_json: str | Path) -> None:
    from esr.judge import build_concreteness_grader
    from esr.latents import SelectionSettings, firing_frequency, read_labels, select_latents, write_selection
    from esr.models import load_model
    from esr.readout import prompt_relevance_activations
    from esr.sae import load_sae

    prompts = read_prompt_list(prompts_path)
    settings = SelectionSettings.from_config(selection_cfg)
    loaded = load_model(spec, path=str(model_dir))
    sae = load_sae(spec.sae, device=loaded.device)
    d_sae = int(sae.cfg.d_sae)
    prompt_acts = (prompt_relevance_activations(loaded, sae, spec.sae_layer, prompts)
                   if settings.relevance_filter != "none" else None)
    if not is_writer():  # tensor parallel: the model work is done; the writer grades labels and writes
        return
    labels = read_labels(labels_csv)
    freq = firing_frequency(labels, d_sae) if "frequency" in labels.columns else None
    grader = build_concreteness_grader(concreteness_cfg, show_progress=False)
    sel = select_latents(model=spec.name, seed=seed, settings=settings, d_sae=d_sae, labels=labels,
                         grader=concreteness_callable(grader), prompt_acts=prompt_acts, n_prompts=len(prompts),
                         firing_freq=freq, progress=True)
    log.info("selected %d latents; filter counts %s", len(sel.latents), sel.counts)
    write_selection(out_json, sel, provenance(selection=selection_cfg, concreteness=grader.describe(),
                                              model=spec.name, sae=spec.sae.ident, seed=seed))


# ------------------------------------------------------------------------------------------------ unsteered answers, detectors

def unsteered_answers(generator, prompts: list[str], seed: int) -> pd.DataFrame:
    """One seeded unsteered answer per prompt (detector discovery's "normal" pairs and the judge's anchors)."""
    from esr.generation import TrialRequest
    from esr.io import derive_seed

    reqs = [TrialRequest(prompt=p, seed=derive_seed(seed, "normal", str(i)), trial_id=f"normal|P{i}")
            for i, p in enumerate(prompts)]
    return pd.DataFrame([{"prompt_id": i, "prompt": r.prompt, "seed": r.seed, "response": r.response,
                          "n_tokens": r.n_tokens} for i, r in enumerate(generator.generate(reqs))])


def discover_detectors_stage(spec: ModelSpec, model_dir: str | Path, prompts_path: str | Path,
                             gen_cfg: dict[str, Any], det_cfg: dict[str, Any], seed: int, out_json: str | Path,
                             answers_parquet: str | Path) -> None:
    """Unsteered answers to every prompt, then OTD discovery (separability and frequency methods) on
    own-answer vs deranged-answer conversations, then matched random control sets."""
    from esr.detectors import (PAPER_SETS, derangement, frequency_detectors, match_quality, matched_random_sets,
                               separability_detectors, top_auc_detectors)
    from esr.readout import conversation_ids, max_pooled_latents
    from esr.io import derive_seed

    prompts = read_prompt_list(prompts_path)
    gen = load_generator_for(spec, model_dir, gen_cfg)
    answers = share(unsteered_answers(gen, prompts, seed))  # tensor parallel: every rank reads out rank 0's text
    if is_writer():
        write_parquet(answers_parquet, answers)
    tok, sae = gen.loaded.tokenizer, gen.directions.sae
    perm = derangement(len(prompts), derive_seed(seed, spec.name, "derangement"))
    normal_seqs = [conversation_ids(tok, prompts[i], answers.response[i])[0] for i in range(len(prompts))]
    shuffled_seqs = [conversation_ids(tok, prompts[i], answers.response[perm[i]])[0] for i in range(len(prompts))]
    normal = max_pooled_latents(gen.loaded, sae, spec.sae_layer, normal_seqs, desc="normal pairs")
    shuffled = max_pooled_latents(gen.loaded, sae, spec.sae_layer, shuffled_seqs, desc="shuffled pairs")
    if not is_writer():
        return
    freq = (normal > 0).mean(axis=0)
    mean_act = normal.mean(axis=0)
    sets: dict[str, dict[str, Any]] = {}
    sep = separability_detectors(normal, shuffled, alive=(np.maximum(normal, shuffled).max(axis=0) > 0),
                                 min_auc=det_cfg.get("min_auc", 1.0))
    fq = frequency_detectors(normal, shuffled, det_cfg["min_shuffled_rate"], max_latents=det_cfg["max_latents"])
    found = [sep, fq]
    if det_cfg.get("top_auc_k"):
        found.append(top_auc_detectors(normal, shuffled, det_cfg["top_auc_k"],
                                       alive=(np.maximum(normal, shuffled).max(axis=0) > 0)))
    for ds in found:
        latents = ds.latents[: det_cfg["max_latents"]]
        sets[ds.name] = {"method": ds.method, "latents": latents, "params": ds.params,
                         "stats": {str(k): v for k, v in ds.stats.items() if k in latents}}
    for name in spec.paper_detector_sets:
        if max(PAPER_SETS[name]) >= sae.cfg.d_sae:
            raise ValueError(f"detectors.paper_sets names {name!r}, whose latent ids exceed this SAE's "
                             f"{sae.cfg.d_sae} latents (the paper's sets belong to the 70B Goodfire SAE)")
        sets[name] = {"method": "paper", "latents": list(PAPER_SETS[name])}
    target = det_cfg["random_control"]["match_to"]
    controls: dict[str, dict[str, Any]] = {}
    if target in sets and sets[target]["latents"]:
        rand = matched_random_sets(sets[target]["latents"], freq, mean_act, det_cfg["random_control"]["n_sets"],
                                   derive_seed(seed, spec.name, "random_control"))
        for i, latents in enumerate(rand):
            controls[f"random_{i}"] = {"method": "matched_random", "matched_to": target, "latents": latents,
                                       "match": match_quality(sets[target]["latents"], latents, freq, mean_act)}
    else:
        log.warning("detector set %r is empty: no random control sets", target)
    write_json(out_json, {"model": spec.name, "n_prompts": len(prompts), "derangement": perm.tolist(),
                          "detector_sets": sets, "random_sets": controls,
                          "provenance": provenance(detectors=det_cfg, model=spec.name, sae=spec.sae.ident,
                                                   seed=seed)})
    log.info("detector sets: %s; random sets: %s", {k: len(v["latents"]) for k, v in sets.items()},
             {k: len(v["latents"]) for k, v in controls.items()})


def calibrate_judge_stage(answers_parquet: str | Path, out_json: str | Path) -> None:
    """Anchor the offline MiniLM judge on this model's own unsteered answers (on-topic: a prompt vs its own
    answer; off-topic: vs the other prompts' answers)."""
    from esr.judge import calibrate_offline

    answers = pd.read_parquet(answers_parquet)
    cal = calibrate_offline(list(answers.prompt), list(answers.response))
    cal.save(out_json)
    log.info("offline judge calibration: %s", cal)


# ------------------------------------------------------------------------------------------------ boost calibration

def judge_for(judge_cfg: dict[str, Any], show_progress: bool = False):
    from esr.judge import build_judge

    return build_judge(judge_cfg, show_progress=show_progress)


def calibrate_stage(spec: ModelSpec, model_dir: str | Path, prompts_path: str | Path, selection_json: str | Path,
                    gen_cfg: dict[str, Any], cal_cfg: dict[str, Any], judge_cfg: dict[str, Any], seed: int,
                    n_shards: int, shard: int, cache_dir: str | Path, out_json: str | Path) -> None:
    from esr.calibration import (BoostPrior, CalibrationCache, CalibrationContext, CalibrationSettings, make_keys,
                                 run_calibration_shard, sample_plan)
    from esr.experiments import shard_of
    from esr.generation import TrialRequest
    from esr.judge import JudgeRequest

    prompts = read_prompt_list(prompts_path)
    selection = read_json(selection_json)
    settings = CalibrationSettings.from_config(cal_cfg)
    labels = {int(x["latent"]): x.get("label") or "" for x in selection["latents"]}
    latents = [lat for lat in labels if shard_of(lat, n_shards) == shard]
    judge = judge_for(judge_cfg)
    gen = load_generator_for(spec, model_dir, gen_cfg, max_new_tokens=settings.max_new_tokens)
    context = CalibrationContext.from_spec(spec, judge_id=judge.judge_id, template_version=judge.template_version,
                                           seed=seed, extra={"temperature": gen_cfg["temperature"],
                                                             "median_resid_norm": gen.directions.median_resid_norm})
    keys = make_keys(context, settings, BoostPrior.from_spec(spec), latents)

    def score_batch(requests):
        reqs, owners = [], []
        for k, r in enumerate(requests):
            for pid, s in sample_plan(r, len(prompts)):
                reqs.append(TrialRequest(prompt=prompts[pid], seed=s, intervention=Intervention(
                    steer_latent=r.latent, boost=float(r.boost))))
                owners.append((k, pid))
        answers = gen.generate(reqs)

        def grade() -> list[float | None]:
            graded = judge.grade_batch([JudgeRequest(prompts[pid], a.response, labels[requests[k].latent])
                                        for (k, pid), a in zip(owners, answers)], show_progress=False)
            per: dict[int, list[float]] = {}
            for (k, _), g in zip(owners, graded):
                if g.ok and g.scores:
                    per.setdefault(k, []).append(g.scores[0] / 100.0)
            # a request whose answers all failed grading (or had no attempt) fails that latent, never loops forever
            return [float(np.mean(per[k])) if per.get(k) else None for k in range(len(requests))]

        return from_writer(grade)  # tensor parallel: the writer calls the judge, every rank steps the same search

    writer = is_writer()
    results = run_calibration_shard(keys, score_batch, CalibrationCache(cache_dir, read_only=not writer),
                                    batch_size=gen_cfg["batch_size"], progress=writer,
                                    out_path=out_json if writer else None, provenance=provenance(
                                        calibration=cal_cfg, judge=judge.describe(), model=spec.name,
                                        sae=spec.sae.ident, seed=seed, shard=shard, n_shards=n_shards))
    if writer:
        log.info("calibrated %d latents (%d failed); judge %s", len(results),
                 sum(r.error is not None for r in results), judge.stats.as_dict())


def gather_calibration_stage(shard_jsons: Sequence[str | Path], out_parquet: str | Path,
                             summary_json: str | Path) -> None:
    from esr.calibration import calibration_table, read_shard_results, summarize_thresholds, write_table

    results = [r for p in shard_jsons for r in read_shard_results(p)]
    table = calibration_table(results)
    write_table(table, out_parquet)
    summary = summarize_thresholds(table)
    write_json(summary_json, {"summary": json.loads(summary.to_json(orient="records")), "n_latents": len(table),
                              "provenance": provenance()})


def thresholds_from(table_parquet: str | Path) -> dict[int, float | None]:
    """latent -> calibrated threshold, None where the calibration failed (those latents run no trials)."""
    df = pd.read_parquet(table_parquet)
    failed = df["error"].notna() if "error" in df.columns else pd.Series(False, index=df.index)
    return {int(lat): None if bad or pd.isna(thr) else float(thr)
            for lat, thr, bad in zip(df["latent"], df["threshold"], failed)}


# ------------------------------------------------------------------------------------------------ plans

def build_plan(experiment: str, condition: str, model: str, selection_json: str | Path,
               thresholds_parquet: str | Path, prompts_path: str | Path, detectors_json: str | Path | None,
               exp_cfg: dict[str, Any]) -> list[TrialSpec]:
    """The trials of one (experiment, condition) for one model, recomputed from the upstream files."""
    from esr import experiments as ex

    prompts = read_prompt_list(prompts_path)
    plans = ex.latent_plans(read_json(selection_json), thresholds_from(thresholds_parquet))
    if experiment == "exp1":
        return ex.plan_steered(model, plans, prompts)
    if experiment == "exp8":
        return ex.plan_no_steering(model, plans, prompts)
    if experiment in ("exp3", "exp10"):
        det = read_json(detectors_json)
        group = det["detector_sets"] if experiment == "exp3" else det["random_sets"]
        if condition not in group or not group[condition]["latents"]:
            # a discovery that found no detectors (or no control matched to them) leaves this condition empty:
            # it is run as zero trials and reported as empty, never silently replaced by another set
            log.warning("%s: latent set %r is empty or absent in %s: no trials", experiment, condition, detectors_json)
            return []
        return ex.plan_ablation(model, plans, prompts, condition, group[condition]["latents"], experiment)
    if experiment == "exp2":
        c = exp_cfg["boost_sweep"]
        return ex.plan_boost_sweep(model, plans, prompts, c["n_latents"], c["prompts_per_latent"], c["n_levels"],
                                   c["sd_range"], c["relative_levels"])
    if experiment == "exp5":
        c = exp_cfg["meta_prompts"]
        return [t for t in ex.plan_meta_prompts(model, plans, prompts, [condition], c["judge_sees_variant"])]
    raise ValueError(f"unknown experiment {experiment!r}")


def capture_latents_for(detectors_json: str | Path | None, selection_json: str | Path | None = None
                        ) -> tuple[list[int], dict[str, list[int]]]:
    """Latents whose per-token activations are stored densely: every detector and random-control set, and the
    selected (steered) latents as group ``selected``."""
    groups: dict[str, list[int]] = {}
    if detectors_json:
        det = read_json(detectors_json)
        groups = {name: list(v["latents"]) for name, v in {**det["detector_sets"], **det["random_sets"]}.items()}
    if selection_json:
        groups["selected"] = sorted(int(x["latent"]) for x in read_json(selection_json)["latents"])
    return sorted({int(j) for v in groups.values() for j in v}), groups


# ------------------------------------------------------------------------------------------------ generation

GEN_COLUMNS = ("response", "n_tokens", "finish_reason", "boost_unit", "steer_coefficient", "steer_residual_norm")


def _request(t: TrialSpec, store_latents: Sequence[int]):
    from esr.generation import TrialRequest

    cap = tuple(sorted(set(store_latents) | ({t.latent} if t.latent is not None else set())))
    iv = Intervention(steer_latent=t.latent if t.steer else None, boost=t.boost if t.steer else 0.0,
                      ablate=t.ablate, capture=cap if store_latents else ())
    return TrialRequest(prompt=t.prompt, seed=t.seed, intervention=iv, trial_id=t.trial_id)


def _rows_from_results(trials: Sequence[TrialSpec], results) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    rows, acts = [], {}
    for t, r in zip(trials, results):
        if r.trial_id != t.trial_id:
            raise RuntimeError(f"generation returned trial {r.trial_id!r} where {t.trial_id!r} was expected")
        rows.append({**t.to_dict(), "response": r.response, "n_tokens": r.n_tokens, "finish_reason": r.finish_reason,
                     "token_ids": list(r.token_ids), "boost_unit": r.steering.get("boost_unit"),
                     "steer_coefficient": r.steering.get("steer_coefficient"),
                     "steer_residual_norm": r.steering.get("steer_residual_norm"),
                     "settings": json.dumps(r.settings, sort_keys=True, default=str)})
        if r.activations is not None:
            acts[t.trial_id] = r.activations
    return rows, acts


def generate_stage(spec: ModelSpec, model_dir: str | Path, trials: list[TrialSpec], gen_cfg: dict[str, Any],
                   out_parquet: str | Path, capture: tuple[list[int], dict[str, list[int]]] | None = None,
                   acts_store: str | Path | None = None, run_provenance: dict[str, Any] | None = None) -> None:
    """Generate ``trials`` in batches; each finished batch is checkpointed in ``<out>.partial/`` (keyed by the plan
    and settings hash) so a killed job resumes where it stopped. With ``capture`` the per-token SAE activations of
    the stored latents are written to the Zarr store ``acts_store``. Models with ``tensor_parallel`` > 1 run this
    stage on every rank (``esr.distributed.run_stage``): same batches everywhere, rank 0 writes."""
    from tqdm.auto import tqdm

    out_parquet = Path(out_parquet)
    store_latents, groups = capture or ([], {})
    plan_hash = stable_hash([t.to_dict() for t in trials] + [gen_cfg, spec.name, store_latents])[:16]
    partial = out_parquet.with_name(out_parquet.name + ".partial") / plan_hash
    partial.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    rows_acts: dict[str, torch.Tensor] = {}
    for f in sorted(partial.glob("batch-*.pt")):  # read by every rank before the first batch: no writes yet
        blob = torch.load(f, weights_only=False)
        done.update({r["trial_id"]: r for r in blob["rows"]})
        rows_acts.update(blob["acts"])
    todo = [t for t in trials if t.trial_id not in done]
    log.info("%d trials planned, %d already generated (resuming), %d to generate", len(trials), len(done), len(todo))
    settings_record: dict[str, Any] = {}
    writer = is_writer()
    if todo:
        gen = load_generator_for(spec, model_dir, gen_cfg)
        settings_record = gen.settings_record()
        bs = gen_cfg["batch_size"]
        for start in tqdm(range(0, len(todo), bs), desc=f"generate {out_parquet.parent.name}", unit="batch",
                          disable=not writer):
            chunk = todo[start:start + bs]
            results = gen.generate_batch([_request(t, store_latents) for t in chunk])
            batch_rows, batch_acts = _rows_from_results(chunk, results)
            if writer:
                torch.save({"rows": batch_rows, "acts": batch_acts}, partial / f"batch-{start:06d}.pt")
            done.update({row["trial_id"]: row for row in batch_rows})
            rows_acts.update(batch_acts)
    if not writer:
        return
    rows = [done[t.trial_id] for t in trials]
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(TrialSpec.__dataclass_fields__) + list(GEN_COLUMNS))
    df["provenance"] = json.dumps({**(run_provenance or {}), "generation": settings_record or None}, default=str)
    if acts_store is not None:
        _write_capture_store(spec, model_dir, trials, done, rows_acts, store_latents, groups, acts_store,
                             run_provenance)
    write_parquet(out_parquet, df)
    import shutil

    shutil.rmtree(partial.parent, ignore_errors=True)


def _write_capture_store(spec, model_dir, trials, rows, acts, store_latents, groups, path, run_provenance) -> None:
    from transformers import AutoTokenizer

    from esr.activations import record_from_capture, write_store

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    records = []
    for t in trials:
        row = rows[t.trial_id]
        if t.trial_id not in acts or row["n_tokens"] == 0:
            continue
        cap = sorted(set(store_latents) | ({t.latent} if t.latent is not None else set()))
        texts = [tok.decode([i]) for i in row["token_ids"]]
        records.append(record_from_capture(t.trial_id, acts[t.trial_id], cap, store_latents, texts,
                                           steered_latent=t.latent))
    if not records:
        raise ValueError(f"no activations were captured for {path}")
    write_store(path, records, store_latents, latent_groups=groups, dtype="float32",
                provenance={**(run_provenance or {}), "model": spec.name, "sae": spec.sae.ident,
                            "layer": spec.sae_layer, "capture": "during generation (steered, as generated)"},
                overwrite=True)


# ------------------------------------------------------------------------------------------------ grading

def grade_stage(gen_parquet: str | Path, judge_cfg: dict[str, Any], out_parquet: str | Path,
                stats_json: str | Path) -> None:
    """Grade every generated answer (content-addressed cache: a rerun after a crash makes no repeated calls)."""
    gen = pd.read_parquet(gen_parquet)
    judge = judge_for(judge_cfg, show_progress=True)
    out = graded_frame(gen, judge)
    write_parquet(out_parquet, out)
    write_json(stats_json, {"judge": judge.describe(), "stats": judge.stats.as_dict(), "n_trials": len(out),
                            "provenance": provenance(judge=judge.describe())})
    log.info("graded %d answers: %s", len(out), judge.stats.as_dict())


def graded_frame(trials: pd.DataFrame, judge) -> pd.DataFrame:
    """``trials`` (needs judge_prompt, response, label, trial_id) graded by ``judge``: a copy with the judge's
    attempts, scores, first/last score, error and raw text as columns (the trials-table grading columns)."""
    from esr.judge import JudgeRequest

    results = judge.grade_batch([JudgeRequest(r.judge_prompt, r.response, r.label or "", r.trial_id)
                                 for r in trials.itertuples()])
    scores = [[a.score for a in g.attempts if a.score is not None] for g in results]
    return trials.assign(
        judge_id=[g.judge_id for g in results], judge_template_version=[g.template_version for g in results],
        attempt_texts=[[a.text for a in g.attempts] for g in results],
        attempt_scores=[[a.score for a in g.attempts] for g in results], n_attempts=[len(x) for x in scores],
        first_score=[x[0] if x else None for x in scores], last_score=[x[-1] if x else None for x in scores],
        error=[g.error for g in results], error_kind=[g.error_kind for g in results],
        judge_raw=[g.raw_text for g in results],
        judge_metadata=[json.dumps(g.metadata, default=str) for g in results])


def gather_trials_stage(graded_parquets: Sequence[str | Path], out_parquet: str | Path) -> None:
    frames = [pd.read_parquet(p) for p in graded_parquets]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(df) and df.trial_id.duplicated().any():
        raise ValueError(f"duplicate trial ids while gathering {out_parquet}")
    write_parquet(out_parquet, df)


def plant_restarts_stage(steered_parquet: str | Path, unsteered_parquet: str | Path, fraction: float, seed: int,
                         out_parquet: str | Path) -> None:
    """POSITIVE CONTROL (embedded default only; SmolLM2 never restarts on its own): a seeded fraction of exp1's
    steered answers get an explicit restart phrase and the unsteered answer to the same prompt and seed appended,
    so the ESR metrics and statistics can be seen to fire. Clearly labelled ``planted`` everywhere."""
    from esr.io import derive_seed

    steered = pd.read_parquet(steered_parquet)
    unsteered = pd.read_parquet(unsteered_parquet).set_index(["latent", "prompt_id", "seed"])
    rng = np.random.default_rng(derive_seed(seed, "planted"))
    pick = rng.random(len(steered)) < fraction
    rows = []
    for flag, r in zip(pick, steered.to_dict("records")):
        if not flag:
            continue
        base = unsteered.loc[(r["latent"], r["prompt_id"], r["seed"])]
        r = dict(r)
        r["response"] = f"{r['response'].rstrip()} Wait, that's not right. Let me start over. {base['response']}"
        r["experiment"], r["condition"] = "planted", "restart"
        r["trial_id"] = r["trial_id"].replace("exp1|steered", "planted|restart")
        rows.append(r)
    write_parquet(out_parquet, pd.DataFrame(rows, columns=steered.columns))
    log.info("planted restarts into %d of %d steered answers", len(rows), len(steered))


# ------------------------------------------------------------------------------------------------ exp9: sequential activations

def _episode_sequence(tok, prompt: str, response: str) -> tuple[list[int], list[tuple[int, int]], int, int, str]:
    """Token ids of the user+assistant conversation, the answer's response-relative token spans, and the
    [first, stop) token range of the answer inside the sequence."""
    from esr.episodes import response_token_spans

    text = response.strip()
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
                                   tokenize=False)
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    start = full.find(text, len(head) - 1 if len(head) else 0)
    if start < 0:
        raise ValueError("the answer text does not appear in its rendered conversation")
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    first, stop, spans = response_token_spans(enc["offset_mapping"], start, start + len(text))
    return list(enc["input_ids"]), spans, first, stop, text


def sequential_stage(spec: ModelSpec, model_dir: str | Path, trials_parquets: Sequence[str | Path],
                     baseline_parquet: str | Path, detectors_json: str | Path, seq_cfg: dict[str, Any], seed: int,
                     out_store: str | Path, out_baseline_store: str | Path, out_json: str | Path,
                     summary_json: str | Path, fig_window: str | Path, fig_regions: str | Path) -> None:
    """exp9: self-correction episodes (exactly two attempts, last > first) located in tokens by restart-phrase
    alignment, replayed through the model (unsteered by default, as the authors' exp9; ``replay_steering`` for
    exp6's steered replay), per-token activations of every detector and control set stored in Zarr, then the
    region analysis, ratios to unsteered baseline answers, and the aligned +/-150-token window in 50 bins."""
    from esr.activations import ActivationRecord, open_store, write_store
    from esr.episodes import make_episode, select_baseline, select_self_correction
    from esr.models import load_model
    from esr.readout import per_token_latents
    from esr.sae import load_sae, steering_directions
    from esr.sequential import (aligned_window, analyze, correction_starts, plot_aligned_window, plot_region_bars,
                                token_group_series, write_analysis)
    from esr.steering import SteeringPlan

    store_latents, groups = capture_latents_for(detectors_json)
    groups = {k: v for k, v in groups.items() if v}
    trials = pd.concat([pd.read_parquet(p) for p in trials_parquets], ignore_index=True).to_dict("records")
    episodes_src = select_self_correction(trials, exclude_ablation=True)
    baseline_src = select_baseline(pd.read_parquet(baseline_parquet).to_dict("records"), source="unsteered",
                                   n=seq_cfg["n_baseline"], seed=seed)
    prov = provenance(sequential=seq_cfg, model=spec.name, sae=spec.sae.ident, seed=seed)
    if not episodes_src or not store_latents:
        if not is_writer():
            return
        log.warning("no self-correction episodes (%d) or no detector latents (%d): exp9 has nothing to analyse",
                    len(episodes_src), len(store_latents))
        write_json(out_json, {"n_episodes": len(episodes_src), "skipped": True, "provenance": prov})
        write_json(summary_json, {"schema": "esr.summary/1", "provenance": prov, "cells": []})
        for f in (fig_window, fig_regions):
            _empty_figure(f, "no self-correction episodes")
        for s in (out_store, out_baseline_store):
            Path(s).mkdir(parents=True, exist_ok=True)
        return
    loaded = load_model(spec, path=str(model_dir))
    sae = load_sae(spec.sae, device=loaded.device)
    tok = loaded.tokenizer
    plan = SteeringPlan(spec.injection_layer, spec.sae_layer)
    directions = steering_directions(spec, sae) if seq_cfg["replay_steering"] else None

    def replay(rows, kind):
        records, skipped = [], 0
        for k, t in enumerate(rows):
            ids, spans, first, stop, text = _episode_sequence(tok, t["prompt"], t["response"])
            if kind == "episode":
                ep = make_episode({**t, "response": text}, f"ep_{k:04d}", method="restart_phrase", spans=spans)
                if ep is None or ep.tokens is None:
                    skipped += 1
                    continue
                regions = ep.tokens.region_labels()
            else:
                regions = ["baseline"] * (stop - first)
            iv = ([Intervention(steer_latent=t["latent"], boost=float(t["boost"]))]
                  if directions is not None and kind == "episode" else None)
            acts = per_token_latents(loaded, sae, spec.sae_layer, [ids], store_latents, interventions=iv,
                                     directions=directions, plan=plan if iv else None)[0][first:stop]
            records.append(ActivationRecord(t["trial_id"], acts.numpy(), [tok.decode([i]) for i in ids[first:stop]],
                                            regions))
        return records, skipped

    ep_records, n_skipped = replay(episodes_src, "episode")
    base_records, _ = replay(baseline_src, "baseline")
    if not is_writer():  # tensor parallel: the replay is done; the writer stores and analyses
        return
    meta = {**prov, "replay": "steered" if directions is not None else "unsteered",
            "boundaries": "restart-phrase alignment", "baseline_source": "unsteered (exp8 answers)"}
    write_store(out_store, ep_records, store_latents, latent_groups=groups, dtype="float32", provenance=meta,
                overwrite=True)
    write_store(out_baseline_store, base_records, store_latents, latent_groups=groups, dtype="float32",
                provenance=meta, overwrite=True)
    sc_ds, base_ds = open_store(out_store), open_store(out_baseline_store)
    result = analyze(sc_ds, base_ds, groups, seed=seed, n_boot=seq_cfg["n_boot"])
    result["n_episodes_without_boundaries"] = n_skipped
    result["planted_episodes"] = sum(1 for t in episodes_src if t.get("experiment") == "planted")
    write_analysis(out_json, result, meta)
    anchors, n_valid = correction_starts(sc_ds), np.asarray(sc_ds.n_tokens.values)
    windows = {name: aligned_window(token_group_series(sc_ds, lat), anchors, n_valid) for name, lat in groups.items()}
    plot_aligned_window(windows, fig_window, title=f"{spec.name}: detector activation around the correction",
                        provenance=meta)
    primary = seq_cfg["primary_group"] if seq_cfg["primary_group"] in result["groups"] else next(iter(result["groups"]))
    plot_region_bars(result["groups"][primary]["regions"], fig_regions,
                     title=f"{spec.name}: {primary} mean activation by region", provenance=meta)
    write_json(summary_json, {"schema": "esr.summary/1", "provenance": meta,
                              "cells": [_exp9_cell(spec.name, primary, result)]})


def _exp9_cell(model: str, group: str, result: dict[str, Any]) -> dict[str, Any]:
    g = result["groups"][group]
    ratios, regions = g["ratios"], g["regions"]
    d_values = [v.get("cohens_d_pooled") for v in g["latent_tests"].values()
                if isinstance(v, dict) and v.get("cohens_d_pooled") is not None]

    def val(estimate, ci=None, n=None):
        return {"estimate": estimate, "ci": ci, "n": n}

    def ratio(name):
        r = ratios.get(name)
        return val(r["estimate"], [r["ci_low"], r["ci_high"]], r.get("n_numerator")) if r else val(None)

    return {"experiment": "exp9", "model": model, "condition": f"group={group}", "n": result["n_episodes"],
            "values": {"offtopic_baseline_ratio": ratio("off_topic"), "ontopic_baseline_ratio": ratio("on_topic"),
                       "otd_mean_off_topic": val(regions["off_topic"]["mean"], n=regions["off_topic"]["n"]),
                       "otd_mean_on_topic": val(regions["on_topic"]["mean"], n=regions["on_topic"]["n"]),
                       "otd_mean_baseline": val(regions["baseline"]["mean"], n=regions["baseline"]["n"]),
                       "d_max": val(max(d_values) if d_values else None),
                       "d_min": val(min(d_values) if d_values else None),
                       "frac_d_positive": val(float(np.mean([d > 0 for d in d_values])) if d_values else None),
                       "n_episodes": val(result["n_episodes"]), "n_baseline_episodes": val(result["n_baseline"]),
                       "n_bins": val(result["window"]["n_bins"])}}


def _empty_figure(path: str | Path, message: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from esr.io import atomic_path

    fig = Figure(figsize=(5, 2))
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, message, ha="center", va="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ------------------------------------------------------------------------------------------------ exp7: cross-judge

def cross_judge_stage(trials_parquet: str | Path, judges: dict[str, dict[str, Any]], n_samples: int, seed: int,
                      out_parquet: str | Path) -> None:
    """Regrade a sample of exp1 trials with other judges: all trials the original judge called multi-attempt plus a
    seeded random fill to ``n_samples`` (so per-judge rates are NOT population rates; agreement is the point).
    Each row keeps the original ``trial_id``; ``judge_id`` names the judge (the original is ``original``)."""
    from esr.io import derive_seed

    df = pd.read_parquet(trials_parquet)
    ok = df[df.error.isna() & (df.response.str.len() > 0)] if len(df) else df
    multi = ok[ok.n_attempts >= 2]
    rest = ok.drop(multi.index)
    n_fill = max(0, n_samples - len(multi))
    fill = rest.sample(n=min(n_fill, len(rest)), random_state=derive_seed(seed, "cross_judge")) if len(rest) else rest
    sample = pd.concat([multi, fill]).sort_values("trial_id")
    frames = [sample.assign(judge_id="original", sample_reason=np.where(sample.n_attempts >= 2, "multi", "fill"))]
    for name, cfg in judges.items():
        judge = judge_for(cfg)
        regraded = graded_frame(sample, judge).assign(judge_id=name, judge_model=judge.judge_id,
                                                      sample_reason=frames[0]["sample_reason"].values)
        frames.append(regraded)
        log.info("cross-judge %s (%s): %s", name, judge.judge_id, judge.stats.as_dict())
    write_parquet(out_parquet, pd.concat(frames, ignore_index=True).assign(experiment="exp7"))

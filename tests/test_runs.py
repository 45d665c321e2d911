"""The experiment stages in one process on a tiny model, local SAE and the fake judge: selection -> detector
discovery -> boost calibration -> generation (with activation capture) -> grading -> planted control -> exp9 ->
summaries -> audit. Checks the plumbing between modules, resumability and pairing."""

import json

import pandas as pd
import pytest
import torch

from esr import runs
from esr.activations import open_store
from esr.config import load_config, model_specs
from esr.experiments import shard_trials
from esr.io import read_json
from esr.testing import write_tiny_workflow

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyrun")
    cfg = load_config(write_tiny_workflow(root))
    spec = model_specs(cfg)["tiny-llama"]
    out = root / "results"
    paths = {"root": root, "cfg": cfg, "spec": spec, "model": spec.path, "prompts": cfg["prompts"]["path"],
             "labels": str(root / "labels.csv"), "selection": out / "selection.json",
             "detectors": out / "detectors.json", "answers": out / "answers.parquet",
             "thresholds": out / "thresholds.parquet"}
    runs.select_latents_stage(spec, spec.path, paths["prompts"], paths["labels"], cfg["selection"],
                              cfg["concreteness"], cfg["seed"], paths["selection"])
    runs.discover_detectors_stage(spec, spec.path, paths["prompts"], cfg["generation"], cfg["detectors"],
                                  cfg["seed"], paths["detectors"], paths["answers"])
    shard_jsons = []
    for shard in range(2):
        p = out / f"cal-{shard}.json"
        runs.calibrate_stage(spec, spec.path, paths["prompts"], paths["selection"], cfg["generation"],
                             cfg["calibration"], cfg["judge"], cfg["seed"], 2, shard, root / "cal_cache", p)
        shard_jsons.append(p)
    runs.gather_calibration_stage(shard_jsons, paths["thresholds"], out / "cal_summary.json")
    return paths


def _plan(tiny, experiment, condition):
    return runs.build_plan(experiment, condition, "tiny-llama", tiny["selection"], tiny["thresholds"],
                           tiny["prompts"], tiny["detectors"], tiny["cfg"]["experiments"])


def test_selection_counts_and_determinism(tiny):
    sel = read_json(tiny["selection"])
    assert len(sel["latents"]) == 4
    assert sel["counts"]["unlabeled"] > 0  # empty labels and feature_<idx> placeholders are counted
    assert all(len(x["prompt_ids"]) == 2 == len(set(x["prompt_ids"])) for x in sel["latents"])
    again = tiny["root"] / "sel2.json"
    runs.select_latents_stage(tiny["spec"], tiny["model"], tiny["prompts"], tiny["labels"], tiny["cfg"]["selection"],
                              tiny["cfg"]["concreteness"], tiny["cfg"]["seed"], again)
    assert read_json(again)["latents"] == sel["latents"]


def test_detectors_and_matched_controls(tiny):
    det = read_json(tiny["detectors"])
    assert set(det["detector_sets"]) == {"discovered_separability", "discovered_frequency", "discovered_top_auc"}
    assert len(det["detector_sets"]["discovered_top_auc"]["latents"]) == 4
    for rs in det["random_sets"].values():
        assert not set(rs["latents"]) & set(det["detector_sets"]["discovered_separability"]["latents"])
    assert len(pd.read_parquet(tiny["answers"])) == 6


def test_thresholds_are_within_bounds_and_cached(tiny):
    table = pd.read_parquet(tiny["thresholds"])
    assert len(table) == 4
    ok = table[table.threshold.notna()]
    assert ((ok.threshold >= 0) & (ok.threshold <= 12)).all()
    assert len(list((tiny["root"] / "cal_cache").glob("*.json"))) == len(ok)


def test_generation_is_paired_resumable_and_captures(tiny, tmp_path):
    exp1 = _plan(tiny, "exp1", "steered")
    abl = _plan(tiny, "exp3", "discovered_top_auc")
    ctl = _plan(tiny, "exp10", "random_0")
    key = [(t.latent, t.prompt_id, t.seed) for t in exp1]
    assert key == [(t.latent, t.prompt_id, t.seed) for t in abl] == [(t.latent, t.prompt_id, t.seed) for t in ctl]
    det = read_json(tiny["detectors"])
    assert all(t.ablate == tuple(sorted(det["detector_sets"]["discovered_top_auc"]["latents"])) for t in abl)
    assert all(t.ablate == tuple(det["random_sets"]["random_0"]["latents"]) for t in ctl)
    # an empty discovered set runs as zero trials, never as another set
    if not det["detector_sets"]["discovered_frequency"]["latents"]:
        assert _plan(tiny, "exp3", "discovered_frequency") == []
    trials = shard_trials(exp1, 2, 0) + shard_trials(exp1, 2, 1)
    assert sorted(t.trial_id for t in trials) == sorted(t.trial_id for t in exp1)
    capture = runs.capture_latents_for(tiny["detectors"], tiny["selection"])
    out = tmp_path / "gen.parquet"
    store = tmp_path / "acts.zarr"
    runs.generate_stage(tiny["spec"], tiny["model"], exp1, tiny["cfg"]["generation"], out, capture=capture,
                        acts_store=store)
    df = pd.read_parquet(out)
    assert list(df.trial_id) == [t.trial_id for t in exp1]
    assert (df.n_tokens > 0).all()
    ds = open_store(store)
    assert ds.sizes["trial"] == len(exp1) and list(ds.latent.values) == capture[0]
    # a rerun with the same plan regenerates identically (seeded per trial)
    out2 = tmp_path / "gen2.parquet"
    runs.generate_stage(tiny["spec"], tiny["model"], exp1, tiny["cfg"]["generation"], out2)
    assert list(pd.read_parquet(out2).response) == list(df.response)


def test_grading_planted_control_sequential_and_audit(tiny, tmp_path):
    cfg = tiny["cfg"]
    gen = {}
    for exp, cond in (("exp1", "steered"), ("exp8", "no_steering")):
        gen[exp] = tmp_path / f"{exp}-gen.parquet"
        runs.generate_stage(tiny["spec"], tiny["model"], _plan(tiny, exp, cond), cfg["generation"], gen[exp])
    planted = tmp_path / "planted-gen.parquet"
    runs.plant_restarts_stage(gen["exp1"], gen["exp8"], 1.0, cfg["seed"], planted)
    graded = {}
    for name, path in (("exp1", gen["exp1"]), ("exp8", gen["exp8"]), ("planted", planted)):
        graded[name] = tmp_path / f"{name}-trials.parquet"
        runs.grade_stage(path, cfg["judge"], graded[name], tmp_path / f"{name}-judge.json")
    p = pd.read_parquet(graded["planted"])
    assert len(p) == len(pd.read_parquet(graded["exp1"])) and (p.n_attempts >= 2).all()
    assert json.loads((tmp_path / "planted-judge.json").read_text())["stats"]["backend_calls"] == len(p)
    # regrading is served from the cache
    runs.grade_stage(planted, cfg["judge"], tmp_path / "again.parquet", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["stats"]["backend_calls"] == 0

    seq = {k: tmp_path / k for k in ("eps.zarr", "base.zarr", "analysis.json", "summary9.json", "w.png", "r.png")}
    runs.sequential_stage(tiny["spec"], tiny["model"], [graded["exp1"], graded["planted"]], graded["exp8"],
                          tiny["detectors"], cfg["sequential"], cfg["seed"], *seq.values())
    analysis = read_json(seq["analysis.json"])
    assert analysis.get("skipped") or analysis["n_episodes"] > 0
    assert seq["w.png"].exists() and seq["r.png"].exists()

    from esr.audit import build_audit, summarise_experiment

    s1 = tmp_path / "s1.json"
    summarise_experiment([graded["exp1"], graded["planted"]], s1, n_boot=50)
    cells = read_json(s1)["cells"]
    planted_cell = next(c for c in cells if c["experiment"] == "planted")
    assert planted_cell["metrics"]["multi_rate"]["k"] == planted_cell["n"]
    rows = build_audit([s1, seq["summary9.json"]], tmp_path / "a.json", tmp_path / "a.md", cfg,
                       model_map=cfg["audit"]["model_map"])
    verdicts = {r.verdict for r in rows}
    assert "not run in this configuration" in verdicts and len(rows) > 40

"""The report's run overview and fidelity notes."""

from __future__ import annotations

import json

import yaml

from esr.config import validate_config
from esr.fidelity import MISSING, fidelity_table
from esr.io import write_json
from esr.report import fidelity_notes, run_overview


def _config(repo_root):
    return validate_config(yaml.safe_load((repo_root / "config/config.yaml").read_text()))


def test_fidelity_notes_state_the_approximations(repo_root):
    notes = " ".join(fidelity_notes(_config(repo_root)))
    assert "APPROXIMATION" in notes and "15/15" in notes
    assert "Planted restarts" not in notes  # the planted control is a test fixture, off in the default
    planted = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    planted["experiments"]["planted_control"] = {"enabled": True, "fraction": 0.25}
    assert "Planted restarts" in " ".join(fidelity_notes(validate_config(planted)))


def test_fidelity_table_lists_every_deviation_the_issue_names_with_this_runs_value(repo_root):
    """Every deviation of issue 17's list has a row, read from the resolved config (not a fixed text)."""
    cfg = _config(repo_root)
    rows = fidelity_table(cfg)
    settings = {r["setting"] for r in rows}
    for key in (
        "calibration.confidence",
        "calibration.query_weight",
        "calibration.round_decimals",
        "models.smollm2-135m.calibration.samples_per_step",
        "selection.n_latents_per_model.smollm2-135m",
        "experiments.meta_prompts.judge_sees_variant",
        "experiments.meta_prompts.wording",
        "experiments.boost_sweep.merge_clamped",
        "selection.relevance_filter",
        "sequential.baseline_source",
        "sequential.boundary_source",
        "judge.json_block",
        "judge.max_tokens",
        "cross_judge.judges.*.temperature",
        "detectors.random_control",
    ):
        assert key in settings, key
    engine = " ".join(r["reference"] for r in rows if r["setting"] == "engine")
    assert "bf16 SAE round trip" in engine and "double-counts" in engine  # SmolLM2 is a Llama
    assert "MLP branch" not in engine  # no Gemma model in the embedded default
    assert all(r["this_run"] != MISSING for r in rows), [r["setting"] for r in rows if r["this_run"] == MISSING]
    by_key = {r["setting"]: r for r in rows}
    assert by_key["generation.max_new_tokens"]["this_run"] == str(cfg["generation"]["max_new_tokens"])
    assert by_key["generation.max_new_tokens"]["matches_reference"] is (cfg["generation"]["max_new_tokens"] == 512)
    cfg["generation"]["max_new_tokens"] = 512
    assert {r["setting"]: r for r in fidelity_table(cfg)}["generation.max_new_tokens"]["matches_reference"] is True


def test_paper_config_fidelity_names_gemma_readouts_and_per_model_values(repo_root):
    cfg = validate_config(yaml.safe_load((repo_root / "config/paper.yaml").read_text()))
    rows = fidelity_table(cfg)
    assert any("MLP branch" in r["reference"] for r in rows)
    samples = {r["setting"]: r["this_run"] for r in rows if r["setting"].endswith("calibration.samples_per_step")}
    assert samples["models.llama-3.3-70b.calibration.samples_per_step"] == "5"
    assert samples["models.gemma-2-2b.calibration.samples_per_step"] == "1"
    assert all(r["this_run"] != MISSING for r in rows), [r["setting"] for r in rows if r["this_run"] == MISSING]


def test_run_overview_lists_cells_and_verdicts(tmp_path, repo_root):
    cfg = _config(repo_root)
    cell = {
        "experiment": "exp1",
        "model": "m",
        "cell": "baseline",
        "n": 10,
        "metrics": {"multi_rate": {"k": 3, "n": 10}, "esr_rate": {"k": 2, "n": 10}},
    }
    write_json(tmp_path / "s.json", {"schema": "esr.summary/1", "cells": [cell]})
    write_json(tmp_path / "a.json", {"verdict_counts": {"consistent": 4, "not testable": 2}})
    run_overview(cfg, [tmp_path / "s.json"], tmp_path / "a.json", tmp_path / "overview.md")
    md = (tmp_path / "overview.md").read_text()
    assert "- exp1 / m / baseline: n=10, multi-attempt 3/10, ESR 2/10" in md
    assert "- consistent: 4" in md and "- not testable: 2" in md
    assert json.loads((tmp_path / "overview.json").read_text())["fidelity_notes"] == fidelity_notes(cfg)


def test_fidelity_notes_name_a_separate_threshold_judge(repo_root):
    cfg = _config(repo_root)
    cfg["threshold_judge"] = {**cfg["judge"], "backend": "anthropic", "model": "claude-haiku-4-5-20251001"}
    assert any("Boost calibration was scored by a different judge (anthropic:" in n for n in fidelity_notes(cfg))
    cfg["threshold_judge"] = dict(cfg["judge"])
    assert not any("different judge" in n for n in fidelity_notes(cfg))


def test_fidelity_rows_of_exp4_appear_only_with_fine_tuning_on(repo_root):
    """Held-out evaluation prompts, drift from steered generations and length matching are stated (from the
    resolved config) when exp4 runs, and absent when it does not."""
    cfg = _config(repo_root)
    exp4_keys = {"finetune.train_on_eval_prompts", "finetune.drift_source", "finetune.length_match"}
    assert not exp4_keys & {r["setting"] for r in fidelity_table(cfg)}
    cfg["finetune"]["enabled"] = True
    by_key = {r["setting"]: r for r in fidelity_table(cfg)}
    assert exp4_keys <= set(by_key)
    assert by_key["finetune.train_on_eval_prompts"]["this_run"] == "false"
    assert by_key["finetune.train_on_eval_prompts"]["matches_reference"] is False
    assert by_key["finetune.length_match"]["matches_reference"] is (not cfg["finetune"]["length_match"])
    cfg["finetune"]["train_on_eval_prompts"] = True
    assert {r["setting"]: r for r in fidelity_table(cfg)}["finetune.train_on_eval_prompts"]["matches_reference"]

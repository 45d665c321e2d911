"""The report's run overview and fidelity notes."""

from __future__ import annotations

import json

import yaml

from esr.config import validate_config
from esr.io import write_json
from esr.report import fidelity_notes, run_overview


def _config(repo_root):
    return validate_config(yaml.safe_load((repo_root / "config/config.yaml").read_text()))


def test_fidelity_notes_state_the_approximations(repo_root):
    notes = " ".join(fidelity_notes(_config(repo_root)))
    assert "APPROXIMATION" in notes and "Planted positive control" in notes and "layer 15" in notes


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

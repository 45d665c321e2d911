"""The whole experiment DAG through Snakemake on a tiny model (local model, local SAE, label CSV, fake judge)."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from esr.audit import not_run_rows_with_inputs
from esr.io import read_json
from esr.testing import write_tiny_workflow


def _snakemake(repo_root, workdir, config, *args, timeout=1800):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(repo_root / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(config),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def tiny_config(tmp_path):
    return write_tiny_workflow(tmp_path)


def test_tiny_dag_plans_every_experiment(repo_root, tiny_config):
    res = _snakemake(repo_root, tiny_config.parent, tiny_config, "-n", "--cores", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    for rule in (
        "select_latents",
        "discover_detectors",
        "calibrate_boosts",
        "generate",
        "grade",
        "plant_restarts",
        "cross_judge",
        "sequential",
        "summarise",
        "compare",
        "specificity",
        "audit",
    ):
        assert f"rule {rule}:" in res.stdout, rule
    assert "rule cross_model:" not in res.stdout  # one model: the size trend is not planned
    assert "build_corpus" not in res.stdout  # a local SAE needs no embedded SAE build


@pytest.mark.slow
def test_tiny_dag_runs_end_to_end_and_reruns_only_grading_after_a_judge_change(repo_root, tiny_config):
    work = tiny_config.parent
    res = _snakemake(repo_root, work, tiny_config, "--cores", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trials = pd.read_parquet(work / "results/exp1/tiny-llama/trials.parquet")
    assert len(trials) == 8 and {"attempt_scores", "first_score", "judge_id", "seed", "boost"} <= set(trials.columns)
    audit = read_json(work / "results/audit/paper_numbers.json")
    assert audit["verdict_counts"]
    # no row says "not run" while the summaries it reads exist (a key the table reads that the code never writes)
    assert not_run_rows_with_inputs(work / "results/audit/paper_numbers.json", work / "results", base_dir=work) == []
    assert (work / "results/figures/fig2_esr_by_model.png").exists()

    # editing a judge setting reruns grading and what depends on it, never generation
    cfg = tiny_config.read_text().replace("restart_gate: true", "restart_gate: false")
    cfg = cfg.replace("backend: fake\n  cache_dir", "backend: fake\n  restart_gate: true\n  cache_dir", 1)
    tiny_config.write_text(cfg)
    changes = _snakemake(repo_root, work, tiny_config, "--list-changes", "params")
    assert changes.returncode == 0, changes.stderr[-2000:]
    # --list-changes params names the regraded shards. (Snakemake 9.27.1 also lists outputs whose params did not
    # change: ParamsChange.__or__ returns an empty change that still carries its files. The dry run below is exact.)
    assert any("graded-" in c for c in changes.stdout.split()), changes.stdout
    plan = _snakemake(repo_root, work, tiny_config, "-n", "--cores", "1", "--rerun-triggers", "params")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "rule grade:" in plan.stdout and "Params have changed" in plan.stdout
    for rule in ("generate", "calibrate_boosts", "select_latents", "discover_detectors"):
        assert f"rule {rule}:" not in plan.stdout, rule

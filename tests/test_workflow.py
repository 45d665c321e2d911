"""The Snakemake side: lint, dry runs of both configs (no network), clear config errors from the CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(repo_root: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*SNAKEMAKE, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(stdout: str) -> dict[str, int]:
    table = stdout.split("job ", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def test_lint_is_clean(repo_root):
    res = run_snakemake(repo_root, "--lint")
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_embedded_default(repo_root):
    res = run_snakemake(repo_root, "-n", "--forceall", "--cores", "1")
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    for rule in (
        "download_model",
        "fetch_prompts",
        "build_corpus",
        "collect_activations",
        "train_sae",
        "label_latents",
    ):
        assert counts.get(rule) == 1, counts
    assert "cross_model" not in counts  # one model: no size trend to test


def test_dry_run_paper_plans_all_five_models_offline(repo_root):
    res = run_snakemake(repo_root, "-n", "--forceall", "--cores", "1", "--configfile", "config/paper.yaml")
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    assert counts["download_model"] == 5 and counts["fetch_sae"] == 5, counts
    assert "build_corpus" not in counts  # paper models use published SAEs
    assert counts["cross_model"] == 1 and counts["specificity"] == 5, counts  # size trend; exp3 vs exp10 per model
    # exp10: one group of 3 controls per set exp3 ablates (the 70B also ablates the paper's two sets)
    for s in ("otd_paper_26", "otd_separability_25", "discovered_separability", "discovered_frequency"):
        assert f"results/exp10/llama-3.3-70b/shards/random_{s}_2/" in res.stdout, s
    assert "results/exp10/gemma-2-2b/shards/random_otd_paper_26_0/" not in res.stdout
    for model in ("llama-3.3-70b", "llama-3.1-8b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b"):
        assert f"resources/models/{model}" in res.stdout


def test_bad_config_fails_naming_the_key(repo_root, tmp_path):
    bad = (repo_root / "config/config.yaml").read_text().replace("repetition_penalty: 1.1", "repetition_penalty: 0.5")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    res = run_snakemake(repo_root, "-n", "--configfile", str(path))
    assert res.returncode != 0
    assert "models.smollm2-135m.repetition_penalty" in res.stdout + res.stderr


@pytest.mark.slow
def test_embedded_workflow_end_to_end(repo_root):
    """The README's main command on the real embedded default, at CI scale (config/ci.yaml merged over it: fewer SAE
    training tokens, latents and prompt variants; cold ~30 min on 2 cores): assets, every experiment, statistics and
    the audit. ``ESR_EMBEDDED_SCALE=full`` runs the default's own sizes (cold ~42 min on 2 cores). The planted
    positive control (off in the default; a test fixture) is switched on explicitly (tests/data/planted_control.yaml)."""
    import json

    import pandas as pd

    full = os.environ.get("ESR_EMBEDDED_SCALE") == "full"
    files = ["config/config.yaml"] + ([] if full else ["config/ci.yaml"]) + ["tests/data/planted_control.yaml"]
    res = run_snakemake(repo_root, "--cores", "2", "--configfile", *files, timeout=5000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = "smollm2-135m"
    ev = json.loads((repo_root / f"results/sae/{m}/sae_report.json").read_text())["evaluation"]
    assert ev["explained_variance"] > 0.7 and ev["l0"] <= 32.0 + 1e-6 and ev["dead_fraction"] < 0.1, ev
    assert len(pd.read_csv(repo_root / f"resources/labels/{m}.csv")) == 4096
    steered = pd.read_parquet(repo_root / f"results/exp1/{m}/trials.parquet")
    unsteered = pd.read_parquet(repo_root / f"results/exp8/{m}/trials.parquet")
    assert len(steered) == len(unsteered) > 0
    # steering at the calibrated threshold derails the answers the offline judge sees as on-topic unsteered
    assert unsteered.first_score.mean() > steered.first_score.mean() + 20
    planted = pd.read_parquet(repo_root / f"results/planted/{m}/trials.parquet")
    # the planted restart is always found; SmolLM2's own text may carry restart language too ("let me try again")
    from esr.judge.segmentation import find_restarts, n_words

    n_restarts = planted.response.map(lambda t: len(find_restarts(t)))
    assert len(planted) > 0 and (n_restarts >= 1).all() and (planted.n_attempts >= 2).all()
    only_planted = (n_restarts == 1) & planted.response.map(lambda t: n_words(t[: find_restarts(t)[0].start]) >= 3)
    assert (planted.n_attempts[only_planted] == 2).all()
    audit = json.loads((repo_root / "results/audit/paper_numbers.json").read_text())
    assert sum(audit["verdict_counts"].values()) == len(audit["numbers"]) > 40
    from esr.audit import not_run_rows_with_inputs

    # issue 17: no audit row is "not run" while the summaries it reads exist in this run
    assert not_run_rows_with_inputs(repo_root / "results/audit/paper_numbers.json", repo_root / "results") == []
    assert (repo_root / f"results/exp9/{m}/aligned_window.png").exists()

"""Per-job fixed cost: what the Snakefile parse and the CPU-only rules' scripts import (benchmarks/job_overhead.py
measures the seconds). Every Snakemake job is a fresh Python process that parses the Snakefile and imports its
rule's stage function, so a heavy import there is paid by every job of a run (203 in the paper rehearsal)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MODEL_PACKAGES = ("torch", "transformers", "sae_lens", "deepspeed", "peft", "accelerate")
SDKS = ("anthropic", "openai", "httpx2")

# the imports of workflow/rules/common.smk (every Snakefile parse: each job, twice for a SLURM job)
COMMON_SMK = (
    "from esr.config import ConfigError, model_specs, validate_config; from esr.experiments import REGISTRY; "
    "from esr.judge.factory import API_BACKENDS; from esr.preflight import check_inputs, local_inputs"
)
# CPU-only rules of workflow/rules/stats.smk, as their workflow/scripts/<rule>.py import them
STATS_RULES = (
    "summarise",
    "compare",
    "cross_model",
    "specificity",
    "cross_judge",
    "model_figures",
    "esr_figure",
    "audit",
)


def loaded_after(stmt: str) -> set[str]:
    """Top-level module names in ``sys.modules`` after running ``stmt`` in a fresh interpreter."""
    code = f"import sys, json; {stmt}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_snakefile_imports_no_model_code_sdks_or_pandas():
    loaded = loaded_after(COMMON_SMK)
    assert not loaded & {*MODEL_PACKAGES, *SDKS, "pandas", "matplotlib", "scipy"}


@pytest.mark.parametrize("rule", STATS_RULES)
def test_cpu_stats_rule_imports_no_model_code_or_sdks(rule):
    loaded = loaded_after(f"from esr.stages import run_rule; from esr.stages.stats import {rule}")
    assert not loaded & {*MODEL_PACKAGES, *SDKS}
    if rule not in ("model_figures", "esr_figure"):
        assert "matplotlib" not in loaded


def test_experiment_rules_skip_transformers_and_sdks():
    """The CPU rules of esr.stages.experiments (gather_*, plant_restarts, grade with a local judge) still load torch
    (the module's model stages share its top-level imports) but not transformers nor the judge SDKs."""
    loaded = loaded_after("from esr.stages.experiments import gather_trials, grade, plant_restarts")
    assert not loaded & {"transformers", "sae_lens", "deepspeed", "peft", *SDKS}


def test_api_judge_loads_its_sdk_on_first_use():
    """The SDK loads when an API judge first needs its client (a batch opens a session), not when it is built."""
    stmt = (
        "from esr.judge.http_backends import AnthropicBackend, ChatSettings; import sys; "
        "b = AnthropicBackend(ChatSettings(model='m', base_url='http://127.0.0.1:9', api_key_env='')); "
        "assert 'anthropic' not in sys.modules; assert b.client_class.__name__ == 'AsyncAnthropic'"
    )
    assert "anthropic" in loaded_after(stmt)

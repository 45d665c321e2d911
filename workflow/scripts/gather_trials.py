"""Rule gather_trials (workflow/rules/experiments.smk): esr.stages.experiments.gather_trials."""

from esr.stages import run_rule
from esr.stages.experiments import gather_trials

run_rule(gather_trials, snakemake)  # noqa: F821

"""Rule generate (workflow/rules/experiments.smk): esr.stages.experiments.generate."""

from esr.stages import run_rule
from esr.stages.experiments import generate

run_rule(generate, snakemake)  # noqa: F821

"""Rule gather_activations (workflow/rules/experiments.smk): esr.stages.experiments.gather_activations."""

from esr.stages import run_rule
from esr.stages.experiments import gather_activations

run_rule(gather_activations, snakemake)  # noqa: F821

"""Rule collect_activations (workflow/rules/sae.smk): esr.stages.sae.collect_activations."""

from esr.stages import run_rule
from esr.stages.sae import collect_activations

run_rule(collect_activations, snakemake)  # noqa: F821

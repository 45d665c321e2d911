"""Rule select_latents (workflow/rules/experiments.smk): esr.stages.experiments.select_latents."""

from esr.stages import run_rule
from esr.stages.experiments import select_latents

run_rule(select_latents, snakemake)  # noqa: F821

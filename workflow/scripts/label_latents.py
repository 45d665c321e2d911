"""Rule label_latents (workflow/rules/sae.smk): esr.stages.sae.label_latents."""

from esr.stages import run_rule
from esr.stages.sae import label_latents

run_rule(label_latents, snakemake)  # noqa: F821

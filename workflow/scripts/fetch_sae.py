"""Rule fetch_sae (workflow/rules/sae.smk): esr.stages.sae.fetch_sae."""

from esr.stages import run_rule
from esr.stages.sae import fetch_sae

run_rule(fetch_sae, snakemake)  # noqa: F821

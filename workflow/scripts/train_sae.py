"""Rule train_sae (workflow/rules/sae.smk): esr.stages.sae.train_sae."""

from esr.stages import run_rule
from esr.stages.sae import train_sae

run_rule(train_sae, snakemake)  # noqa: F821

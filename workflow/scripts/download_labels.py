"""Rule download_labels (workflow/rules/sae.smk): esr.stages.sae.download_labels."""

from esr.stages import run_rule
from esr.stages.sae import download_labels

run_rule(download_labels, snakemake)  # noqa: F821

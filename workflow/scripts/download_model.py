"""Rule download_model (workflow/rules/assets.smk): esr.stages.assets.download_model."""

from esr.stages import run_rule
from esr.stages.assets import download_model

run_rule(download_model, snakemake)  # noqa: F821

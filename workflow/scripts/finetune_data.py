"""Rule finetune_data (workflow/rules/finetune.smk): esr.stages.finetune.finetune_data."""

from esr.stages import run_rule
from esr.stages.finetune import finetune_data

run_rule(finetune_data, snakemake)  # noqa: F821

"""Rule finetune_lora (workflow/rules/finetune.smk): esr.stages.finetune.finetune_lora."""

from esr.stages import run_rule
from esr.stages.finetune import finetune_lora

run_rule(finetune_lora, snakemake)  # noqa: F821

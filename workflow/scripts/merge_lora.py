"""Rule merge_lora (workflow/rules/finetune.smk): esr.stages.finetune.merge_lora."""

from esr.stages import run_rule
from esr.stages.finetune import merge_lora

run_rule(merge_lora, snakemake)  # noqa: F821

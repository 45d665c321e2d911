"""Rule summarise_exp4 (workflow/rules/finetune.smk): esr.stages.finetune.summarise_exp4."""

from esr.stages import run_rule
from esr.stages.finetune import summarise_exp4

run_rule(summarise_exp4, snakemake)  # noqa: F821

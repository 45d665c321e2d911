"""Rule finetune_material (workflow/rules/finetune.smk): esr.stages.finetune.finetune_material."""

from esr.stages import run_rule
from esr.stages.finetune import finetune_material

run_rule(finetune_material, snakemake)  # noqa: F821

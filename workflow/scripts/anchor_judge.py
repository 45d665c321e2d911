"""Rule anchor_judge (workflow/rules/experiments.smk): esr.stages.experiments.anchor_judge."""

from esr.stages import run_rule
from esr.stages.experiments import anchor_judge

run_rule(anchor_judge, snakemake)  # noqa: F821

"""Rule specificity (workflow/rules/stats.smk): esr.stages.stats.specificity."""

from esr.stages import run_rule
from esr.stages.stats import specificity

run_rule(specificity, snakemake)  # noqa: F821

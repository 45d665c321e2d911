"""Rule summarise (workflow/rules/stats.smk): esr.stages.stats.summarise."""

from esr.stages import run_rule
from esr.stages.stats import summarise

run_rule(summarise, snakemake)  # noqa: F821

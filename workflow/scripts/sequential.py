"""Rule sequential (workflow/rules/stats.smk): esr.stages.stats.sequential."""

from esr.stages import run_rule
from esr.stages.stats import sequential

run_rule(sequential, snakemake)  # noqa: F821

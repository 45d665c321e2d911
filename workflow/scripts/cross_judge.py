"""Rule cross_judge (workflow/rules/stats.smk): esr.stages.stats.cross_judge."""

from esr.stages import run_rule
from esr.stages.stats import cross_judge

run_rule(cross_judge, snakemake)  # noqa: F821

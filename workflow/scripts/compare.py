"""Rule compare (workflow/rules/stats.smk): esr.stages.stats.compare."""

from esr.stages import run_rule
from esr.stages.stats import compare

run_rule(compare, snakemake)  # noqa: F821

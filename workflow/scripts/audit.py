"""Rule audit (workflow/rules/stats.smk): esr.stages.stats.audit."""

from esr.stages import run_rule
from esr.stages.stats import audit

run_rule(audit, snakemake)  # noqa: F821

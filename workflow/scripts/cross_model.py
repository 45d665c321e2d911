"""Rule cross_model (workflow/rules/stats.smk): esr.stages.stats.cross_model."""

from esr.stages import run_rule
from esr.stages.stats import cross_model

run_rule(cross_model, snakemake)  # noqa: F821

"""Rule esr_figure (workflow/rules/stats.smk): esr.stages.stats.esr_figure."""

from esr.stages import run_rule
from esr.stages.stats import esr_figure

run_rule(esr_figure, snakemake)  # noqa: F821

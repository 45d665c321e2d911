"""Rule model_figures (workflow/rules/stats.smk): esr.stages.stats.model_figures."""

from esr.stages import run_rule
from esr.stages.stats import model_figures

run_rule(model_figures, snakemake)  # noqa: F821

"""Rule grade (workflow/rules/experiments.smk): esr.stages.experiments.grade."""

from esr.stages import run_rule
from esr.stages.experiments import grade

run_rule(grade, snakemake)  # noqa: F821

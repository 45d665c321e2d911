"""Rule plant_restarts (workflow/rules/experiments.smk): esr.stages.experiments.plant_restarts."""

from esr.stages import run_rule
from esr.stages.experiments import plant_restarts

run_rule(plant_restarts, snakemake)  # noqa: F821

"""Rule calibrate_boosts (workflow/rules/experiments.smk): esr.stages.experiments.calibrate_boosts."""

from esr.stages import run_rule
from esr.stages.experiments import calibrate_boosts

run_rule(calibrate_boosts, snakemake)  # noqa: F821

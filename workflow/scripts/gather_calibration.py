"""Rule gather_calibration (workflow/rules/experiments.smk): esr.stages.experiments.gather_calibration."""

from esr.stages import run_rule
from esr.stages.experiments import gather_calibration

run_rule(gather_calibration, snakemake)  # noqa: F821

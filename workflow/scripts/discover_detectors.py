"""Rule discover_detectors (workflow/rules/experiments.smk): esr.stages.experiments.discover_detectors."""

from esr.stages import run_rule
from esr.stages.experiments import discover_detectors

run_rule(discover_detectors, snakemake)  # noqa: F821

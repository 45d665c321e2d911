"""Rule fetch_prompts (workflow/rules/assets.smk): esr.stages.assets.fetch_prompts."""

from esr.stages import run_rule
from esr.stages.assets import fetch_prompts

run_rule(fetch_prompts, snakemake)  # noqa: F821

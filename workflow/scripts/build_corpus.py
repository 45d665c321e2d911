"""Rule build_corpus (workflow/rules/sae.smk): esr.stages.sae.build_corpus."""

from esr.stages import run_rule
from esr.stages.sae import build_corpus

run_rule(build_corpus, snakemake)  # noqa: F821

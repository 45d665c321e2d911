from esr.runs import discover_detectors_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    discover_detectors_stage(p.spec, snakemake.input.model, snakemake.input.prompts, p.generation, p.detectors,
                             p.seed, snakemake.output.detectors, snakemake.output.answers)

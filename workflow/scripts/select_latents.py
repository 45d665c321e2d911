from esr.runs import select_latents_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    select_latents_stage(p.spec, snakemake.input.model, snakemake.input.prompts, snakemake.input.labels, p.selection,
                         p.concreteness, p.seed, snakemake.output[0])

from esr.stages import prompts_stage, stage_logging

with stage_logging(snakemake.log[0]):
    prompts_stage(snakemake.params.prompts, snakemake.output[0])

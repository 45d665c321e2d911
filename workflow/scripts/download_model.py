from esr.stages import prepare_model_stage, stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    prepare_model_stage(snakemake.params.spec, snakemake.output[0])

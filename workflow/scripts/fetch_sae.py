from esr.stages import fetch_sae_stage, stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    fetch_sae_stage(snakemake.params.spec, snakemake.output[0])

from esr.stages import label_stage, stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    label_stage(snakemake.params.spec, snakemake.input.model, snakemake.input.sae, snakemake.input.acts,
                snakemake.params.sae_cfg, snakemake.output[0])

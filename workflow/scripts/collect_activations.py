from esr.stages import collect_stage, stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    collect_stage(snakemake.params.spec, snakemake.input.model, snakemake.input.corpus, snakemake.params.sae_cfg,
                  snakemake.output[0])

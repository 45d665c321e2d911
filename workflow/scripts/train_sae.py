from esr.stages import stage_logging, train_sae_stage

with stage_logging(snakemake.log[0], snakemake.threads):
    train_sae_stage(snakemake.params.spec, snakemake.input.acts, snakemake.params.sae_cfg, snakemake.params.seed,
                    snakemake.output.sae, snakemake.output.report, snakemake.output.report_md)

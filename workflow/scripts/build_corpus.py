from esr.stages import corpus_stage, stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    corpus_stage(snakemake.params.spec, snakemake.input.model, snakemake.params.sae_cfg, snakemake.params.seed,
                 snakemake.output[0])

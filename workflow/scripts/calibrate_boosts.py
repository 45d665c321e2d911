from esr.runs import calibrate_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    calibrate_stage(p.spec, snakemake.input.model, snakemake.input.prompts, snakemake.input.selection, p.generation,
                    p.calibration, p.judge, p.seed, p.n_shards, int(snakemake.wildcards.shard), p.cache_dir,
                    snakemake.output[0])

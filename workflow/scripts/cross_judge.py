from esr.runs import cross_judge_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    cross_judge_stage(snakemake.input.trials, p.judges, p.n_samples, p.seed, snakemake.output[0])

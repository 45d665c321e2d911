from esr.audit import summarise_cross_judge, summarise_experiment
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    if snakemake.wildcards.experiment == "exp7":
        summarise_cross_judge([snakemake.input[0]], snakemake.output[0])
    else:
        summarise_experiment([snakemake.input[0]], snakemake.output[0], n_boot=snakemake.params.n_boot,
                             seed=snakemake.params.seed)

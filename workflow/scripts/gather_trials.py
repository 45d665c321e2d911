from esr.runs import gather_trials_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    gather_trials_stage(list(snakemake.input), snakemake.output[0])

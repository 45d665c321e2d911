from esr.runs import calibrate_judge_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    calibrate_judge_stage(snakemake.input[0], snakemake.output[0])

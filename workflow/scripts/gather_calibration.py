from esr.runs import gather_calibration_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    gather_calibration_stage(list(snakemake.input), snakemake.output.table, snakemake.output.summary)

from esr.runs import plant_restarts_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    plant_restarts_stage(snakemake.input.steered, snakemake.input.unsteered, snakemake.params.fraction,
                         snakemake.params.seed, snakemake.output[0])

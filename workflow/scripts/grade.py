from esr.runs import grade_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    grade_stage(snakemake.input.gen, snakemake.params.judge, snakemake.output.graded, snakemake.output.stats)

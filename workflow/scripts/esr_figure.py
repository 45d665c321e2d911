from esr.report import esr_by_model_figure
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    esr_by_model_figure(list(snakemake.input), snakemake.output[0], snakemake.params.order)

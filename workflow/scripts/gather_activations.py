from esr.activations import gather_stores
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    gather_stores(list(snakemake.input), snakemake.output[0], overwrite=True)

from esr.runs import sequential_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    i, o, p = snakemake.input, snakemake.output, snakemake.params
    sequential_stage(p.spec, i.model, list(i.trials), i.baseline, i.detectors, p.sequential, p.seed, o.store,
                     o.baseline_store, o.analysis, o.summary, o.window, o.regions)

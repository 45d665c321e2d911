from esr.audit import compare_experiments
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    others = [{"experiment": e, "condition": "*"} for e in ("exp3", "exp10", "exp5", "exp8", "planted")]
    compare_experiments(list(snakemake.input), snakemake.output[0], others=others, seed=snakemake.params.seed,
                        n_params=snakemake.params.n_params)

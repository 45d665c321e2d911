from esr.report import ablation_figure, meta_prompt_figure, sweep_figure
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    i, o, m = snakemake.input, snakemake.output, snakemake.wildcards.model
    ablation_figure(m, i.exp1, {k: i[k] for k in ("exp3", "exp10") if k in i.keys()}, o.ablation)
    meta_prompt_figure(m, i.exp1, i.get("exp5", i.exp1), o.meta)
    sweep_figure(m, i.get("exp2", i.exp1), o.sweep)

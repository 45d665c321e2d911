from pathlib import Path

from esr.distributed import run_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    i, o, p = snakemake.input, snakemake.output, snakemake.params
    run_stage("sequential_stage", dict(
        spec=p.spec, model_dir=i.model, trials_parquets=list(i.trials), baseline_parquet=i.baseline,
        detectors_json=i.detectors, seq_cfg=p.sequential, seed=p.seed, out_store=o.store,
        out_baseline_store=o.baseline_store, out_json=o.analysis, summary_json=o.summary, fig_window=o.window,
        fig_regions=o.regions), p.spec.tensor_parallel, scratch_dir=Path(o.analysis).parent)

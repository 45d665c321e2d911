from pathlib import Path

from esr.distributed import run_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    run_stage("select_latents_stage", dict(
        spec=p.spec, model_dir=snakemake.input.model, prompts_path=snakemake.input.prompts,
        labels_csv=snakemake.input.labels, selection_cfg=p.selection, concreteness_cfg=p.concreteness, seed=p.seed,
        out_json=snakemake.output[0]), p.spec.tensor_parallel, scratch_dir=Path(snakemake.output[0]).parent)

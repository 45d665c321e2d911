from pathlib import Path

from esr.distributed import run_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p, o = snakemake.params, snakemake.output
    run_stage("discover_detectors_stage", dict(
        spec=p.spec, model_dir=snakemake.input.model, prompts_path=snakemake.input.prompts, gen_cfg=p.generation,
        det_cfg=p.detectors, seed=p.seed, out_json=o.detectors, answers_parquet=o.answers),
        p.spec.tensor_parallel, scratch_dir=Path(o.detectors).parent)

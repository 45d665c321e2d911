from esr.distributed import run_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    run_stage("calibrate_stage", dict(
        spec=p.spec, model_dir=snakemake.input.model, prompts_path=snakemake.input.prompts,
        selection_json=snakemake.input.selection, gen_cfg=p.generation, cal_cfg=p.calibration, judge_cfg=p.judge,
        seed=p.seed, n_shards=p.n_shards, shard=int(snakemake.wildcards.shard), cache_dir=p.cache_dir,
        out_json=snakemake.output[0]), p.spec.tensor_parallel, scratch_dir=p.cache_dir)

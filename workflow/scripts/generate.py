from pathlib import Path

from esr.distributed import run_stage
from esr.experiments import shard_trials
from esr.provenance import provenance
from esr.runs import build_plan, capture_latents_for
from esr.stages import stage_logging

with stage_logging(snakemake.log[0], snakemake.threads):
    w, p, i = snakemake.wildcards, snakemake.params, snakemake.input
    experiment = w.get("experiment", "exp1")
    condition = w.get("condition", "steered")
    trials = build_plan(experiment, condition, w.model, i.selection, i.thresholds, i.prompts, i.detectors,
                        p.experiments)
    trials = shard_trials(trials, p.n_shards, int(w.shard))
    capture = capture_latents_for(i.detectors, i.selection) if experiment == "exp1" else None
    out = snakemake.output.gen
    run_stage("generate_stage", dict(
        spec=p.spec, model_dir=i.model, trials=trials, gen_cfg=p.generation, out_parquet=out, capture=capture,
        acts_store=snakemake.output.get("acts"),
        run_provenance=provenance(generation=p.generation, experiments=p.experiments, model=w.model,
                                  sae=p.spec.sae.ident, revision=p.spec.revision, seed=p.seed,
                                  experiment=experiment, condition=condition, shard=int(w.shard))),
        p.spec.tensor_parallel, scratch_dir=Path(out).parent)

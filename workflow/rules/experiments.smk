# The experiment DAG per model: latent selection -> detector discovery (unsteered answers) -> judge anchors ->
# boost calibration (sharded) -> generation per (experiment, condition, latent shard) -> grading (separate rule,
# so a judge change reruns grading and statistics only; one job per condition and grading.shards group) -> one
# trials table per experiment. Shards per model: latent_shards / latent_shards_per_model (common.smk n_shards).
# A fine-tuned model (exp4) reads its finetune_data manifest: selection, detector discovery (and so the judge's
# anchors) and calibration use its held-out evaluation prompts only; every experiment replays the selection's prompts.
# Rule bodies: esr.stages.experiments; experiments and their conditions: esr.experiments.REGISTRY.


rule select_latents:
    input:
        model_dir=model_dir,
        sae=sae_input,
        labels=labels_input,
        prompts=PROMPTS,
        finetune_manifest=finetune_manifest_input,
    output:
        selection="results/selection/{model}/selection.json",
    log:
        "logs/select_latents/{model}.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=model_resources("mem_mb", 8000),
        runtime=60,
        gpu=model_resources("gpu", 0),
    params:
        spec=model_spec,
        settings=config.get("selection"),
        concreteness=config.get("concreteness"),
        seed=config["seed"],
    script:
        "../scripts/select_latents.py"


rule discover_detectors:
    input:
        model_dir=model_dir,
        sae=sae_input,
        prompts=PROMPTS,
        finetune_manifest=finetune_manifest_input,
    output:
        detectors="results/detectors/{model}/detectors.json",
        answers="results/detectors/{model}/unsteered_answers.parquet",
    log:
        "logs/discover_detectors/{model}.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=model_resources("mem_mb", 8000),
        runtime=model_resources("runtime_min", 120),
        gpu=model_resources("gpu", 0),
    params:
        spec=model_spec,
        generation=config.get("generation"),
        settings=config.get("detectors"),
        ablated=ablated_sets,
        seed=config["seed"],
    script:
        "../scripts/discover_detectors.py"


rule anchor_judge:
    input:
        answers="results/detectors/{model}/unsteered_answers.parquet",
    output:
        anchors=anchors_file("{model}"),
    log:
        "logs/anchor_judge/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/anchor_judge.py"


rule calibrate_boosts:
    input:
        model_dir=model_dir,
        sae=sae_input,
        prompts=PROMPTS,
        selection="results/selection/{model}/selection.json",
        judge_anchors=judge_anchors_input("threshold_judge"),
        finetune_manifest=finetune_manifest_input,
    output:
        shard_result="results/calibration/{model}/shard-{shard}.json",
    log:
        "logs/calibrate_boosts/{model}/shard-{shard}.log",
    benchmark:
        "benchmarks/calibrate_boosts/{model}/shard-{shard}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=model_resources("mem_mb", 8000),
        runtime=model_resources("runtime_min", 120),
        gpu=model_resources("gpu", 0),
    params:
        spec=model_spec,
        generation=config.get("generation"),
        settings=config.get("calibration"),
        judge=judge_config("threshold_judge"),
        seed=config["seed"],
        n_shards=lambda w: n_shards(w.model),
        cache_dir="resources/calibration_cache",
    script:
        "../scripts/calibrate_boosts.py"


rule gather_calibration:
    input:
        shards=lambda w: expand("results/calibration/{model}/shard-{shard}.json", model=w.model, shard=shards(w.model)),
    output:
        thresholds="results/calibration/{model}/thresholds.parquet",
        summary="results/calibration/{model}/summary.json",
    log:
        "logs/gather_calibration/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/gather_calibration.py"


rule generate:
    input:
        model_dir=model_dir,
        sae=sae_input,
        prompts=PROMPTS,
        selection="results/selection/{model}/selection.json",
        thresholds="results/calibration/{model}/thresholds.parquet",
        detectors=detectors_input,
    output:
        trials="results/{experiment}/{model}/shards/{condition}/gen-{shard}.parquet",
        activations=directory("results/{experiment}/{model}/shards/{condition}/acts-{shard}.zarr"),
    log:
        "logs/generate/{experiment}/{model}/{condition}-{shard}.log",
    # wall time per job (s): the basis for sizing latent_shards (README "Running the paper's models on a cluster")
    benchmark:
        "benchmarks/generate/{experiment}/{model}/{condition}-{shard}.tsv"
    wildcard_constraints:
        experiment=alternation(experiments_made_by("generate")),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=model_resources("mem_mb", 8000),
        runtime=model_resources("runtime_min", 120),
        gpu=model_resources("gpu", 0),
    params:
        spec=model_spec,
        generation=config.get("generation"),
        settings=EXP,
        n_shards=lambda w: n_shards(w.model),
        seed=config["seed"],
    script:
        "../scripts/generate.py"


rule plant_restarts:
    input:
        steered="results/exp1/{model}/shards/steered/gen-{shard}.parquet",
        unsteered="results/exp8/{model}/shards/no_steering/gen-{shard}.parquet",
    output:
        trials="results/planted/{model}/shards/restart/gen-{shard}.parquet",
    log:
        "logs/plant_restarts/{model}/{shard}.log",
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        fraction=EXP.get("planted_control", {}).get("fraction", 0.0),
        seed=config["seed"],
    script:
        "../scripts/plant_restarts.py"


# {shard} here is a grading group (grading_groups: several generation shards), graded in one job.
rule grade:
    input:
        generated=generated_for_grading,
        judge_anchors=judge_anchors_input("judge"),
    output:
        trials="results/{experiment}/{model}/shards/{condition}/graded-{shard}.parquet",
        judge_stats="results/{experiment}/{model}/shards/{condition}/judge-stats-{shard}.json",
    log:
        "logs/grade/{experiment}/{model}/{condition}-{shard}.log",
    wildcard_constraints:
        experiment=alternation(experiments_made_by("generate", "plant_restarts")),
    # API judges run on the login node (grading.run_on: login), offline ones as cluster jobs
    localrule: GRADE_LOCAL
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        judge=judge_config("judge"),
    script:
        "../scripts/grade.py"


rule gather_trials:
    input:
        shards=graded_shards,
    output:
        trials="results/{experiment}/{model}/trials.parquet",
    log:
        "logs/gather_trials/{experiment}/{model}.log",
    wildcard_constraints:
        experiment=alternation(experiments_made_by("generate", "plant_restarts")),
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/gather_trials.py"


rule gather_activations:
    input:
        shards=lambda w: expand(
            "results/exp1/{model}/shards/steered/acts-{shard}.zarr", model=w.model, shard=shards(w.model)
        ),
    output:
        store=directory("results/activations/{model}/exp1.zarr"),
    log:
        "logs/gather_activations/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/gather_activations.py"

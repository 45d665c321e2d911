# The experiment DAG per model: latent selection -> detector discovery (unsteered answers) -> judge anchoring ->
# boost calibration (sharded) -> generation per (experiment, condition, latent shard) -> grading (separate rule,
# so a judge change reruns grading and statistics only) -> one trials table per experiment.


rule select_latents:
    input:
        model=model_dir,
        sae=sae_input,
        labels=labels_input,
        prompts="resources/prompts/prompts.txt",
    output:
        "results/selection/{model}/selection.json",
    params:
        spec=model_spec,
        selection=config.get("selection"),
        concreteness=config.get("concreteness"),
        seed=config["seed"],
    log:
        "logs/select_latents/{model}.log",
    threads: 4
    resources:
        mem_mb=lambda w: model_resources(w, "mem_mb", 8000),
        runtime=60,
        gpu=lambda w: model_resources(w, "gpu", 0),
    conda:
        ENV
    script:
        "../scripts/select_latents.py"


rule discover_detectors:
    input:
        model=model_dir,
        sae=sae_input,
        prompts="resources/prompts/prompts.txt",
    output:
        detectors="results/detectors/{model}/detectors.json",
        answers="results/detectors/{model}/unsteered_answers.parquet",
    params:
        spec=model_spec,
        generation=config.get("generation"),
        detectors=config.get("detectors"),
        seed=config["seed"],
    log:
        "logs/discover_detectors/{model}.log",
    threads: 4
    resources:
        mem_mb=lambda w: model_resources(w, "mem_mb", 8000),
        runtime=lambda w: model_resources(w, "runtime_min", 120),
        gpu=lambda w: model_resources(w, "gpu", 0),
    conda:
        ENV
    script:
        "../scripts/discover_detectors.py"


rule calibrate_judge:
    input:
        "results/detectors/{model}/unsteered_answers.parquet",
    output:
        "results/judge/{model}/offline_calibration.json",
    log:
        "logs/calibrate_judge/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/calibrate_judge.py"


rule calibrate_boosts:
    input:
        model=model_dir,
        sae=sae_input,
        prompts="resources/prompts/prompts.txt",
        selection="results/selection/{model}/selection.json",
        judge_calibration=lambda w: judge_calibration_input(w, "calibration_judge"),
    output:
        "results/calibration/{model}/shard-{shard}.json",
    params:
        spec=model_spec,
        generation=config.get("generation"),
        calibration=config.get("calibration"),
        judge=lambda w: judge_config(w.model, "calibration_judge"),
        seed=config["seed"],
        n_shards=N_SHARDS,
        cache_dir="resources/calibration_cache",
    log:
        "logs/calibrate_boosts/{model}/shard-{shard}.log",
    threads: 4
    resources:
        mem_mb=lambda w: model_resources(w, "mem_mb", 8000),
        runtime=lambda w: model_resources(w, "runtime_min", 120),
        gpu=lambda w: model_resources(w, "gpu", 0),
    conda:
        ENV
    script:
        "../scripts/calibrate_boosts.py"


rule gather_calibration:
    input:
        expand("results/calibration/{{model}}/shard-{shard}.json", shard=SHARDS),
    output:
        table="results/calibration/{model}/thresholds.parquet",
        summary="results/calibration/{model}/summary.json",
    log:
        "logs/gather_calibration/{model}.log",
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/gather_calibration.py"


rule generate_exp1:
    input:
        model=model_dir,
        sae=sae_input,
        prompts="resources/prompts/prompts.txt",
        selection="results/selection/{model}/selection.json",
        thresholds="results/calibration/{model}/thresholds.parquet",
        detectors=detectors_input,
    output:
        gen="results/exp1/{model}/shards/steered/gen-{shard}.parquet",
        acts=directory("results/exp1/{model}/shards/steered/acts-{shard}.zarr"),
    params:
        spec=model_spec,
        generation=config.get("generation"),
        experiments=EXP,
        n_shards=N_SHARDS,
        seed=config["seed"],
    log:
        "logs/generate/exp1/{model}/steered-{shard}.log",
    threads: 4
    resources:
        mem_mb=lambda w: model_resources(w, "mem_mb", 8000),
        runtime=lambda w: model_resources(w, "runtime_min", 120),
        gpu=lambda w: model_resources(w, "gpu", 0),
    conda:
        ENV
    script:
        "../scripts/generate.py"


rule generate:
    input:
        model=model_dir,
        sae=sae_input,
        prompts="resources/prompts/prompts.txt",
        selection="results/selection/{model}/selection.json",
        thresholds="results/calibration/{model}/thresholds.parquet",
        detectors=detectors_input,
    output:
        gen="results/{experiment}/{model}/shards/{condition}/gen-{shard}.parquet",
    wildcard_constraints:
        experiment="exp8|exp2|exp3|exp5|exp10",
    params:
        spec=model_spec,
        generation=config.get("generation"),
        experiments=EXP,
        n_shards=N_SHARDS,
        seed=config["seed"],
    log:
        "logs/generate/{experiment}/{model}/{condition}-{shard}.log",
    threads: 4
    resources:
        mem_mb=lambda w: model_resources(w, "mem_mb", 8000),
        runtime=lambda w: model_resources(w, "runtime_min", 120),
        gpu=lambda w: model_resources(w, "gpu", 0),
    conda:
        ENV
    script:
        "../scripts/generate.py"


rule plant_restarts:
    input:
        steered="results/exp1/{model}/shards/steered/gen-{shard}.parquet",
        unsteered="results/exp8/{model}/shards/no_steering/gen-{shard}.parquet",
    output:
        "results/planted/{model}/shards/restart/gen-{shard}.parquet",
    params:
        fraction=EXP.get("planted_control", {}).get("fraction", 0.0),
        seed=config["seed"],
    log:
        "logs/plant_restarts/{model}/{shard}.log",
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/plant_restarts.py"


rule grade:
    input:
        gen="results/{experiment}/{model}/shards/{condition}/gen-{shard}.parquet",
        judge_calibration=judge_calibration_input,
    output:
        graded="results/{experiment}/{model}/shards/{condition}/graded-{shard}.parquet",
        stats="results/{experiment}/{model}/shards/{condition}/judge-stats-{shard}.json",
    wildcard_constraints:
        experiment="exp1|exp8|exp2|exp3|exp5|exp10|planted",
    params:
        judge=lambda w: judge_config(w.model),
    log:
        "logs/grade/{experiment}/{model}/{condition}-{shard}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    script:
        "../scripts/grade.py"


rule gather_trials:
    input:
        graded_shards,
    output:
        "results/{experiment}/{model}/trials.parquet",
    wildcard_constraints:
        experiment="exp1|exp8|exp2|exp3|exp5|exp10|planted",
    log:
        "logs/gather_trials/{experiment}/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/gather_trials.py"


rule gather_activations:
    input:
        expand("results/exp1/{{model}}/shards/steered/acts-{shard}.zarr", shard=SHARDS),
    output:
        directory("results/activations/{model}/exp1.zarr"),
    log:
        "logs/gather_activations/{model}.log",
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/gather_activations.py"

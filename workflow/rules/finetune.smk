# Exp4 (reference protocol 6.9): LoRA fine-tuning on masked self-correction examples. For a model entry with
# source: finetuned and base_model: <base> (needs finetune.enabled): finetune_material (once per base model, shared by
# every ratio of the sweep: the prompt split and the base model's own unsteered answers and steered drift on the
# training prompts, the drift graded when finetune.drift_max_score is set) -> finetune_data (per fine-tuned model:
# its mix at its masked ratio) -> finetune_lora (peft, resumable per epoch) -> merge_lora (resources/models/<name>,
# loaded like any other model). Rule bodies: esr.stages.finetune; input functions: common.smk and below.
ruleorder: merge_lora > download_model


rule finetune_material:
    input:
        unpack(finetune_drift_judge_inputs),
        model_dir=model_dir,
        sae=sae_input,
        prompt_list=PROMPTS,
        drift_file=finetune_drift_input,
    output:
        answers="results/finetune_material/{model}/answers.parquet",
        drift="results/finetune_material/{model}/drift.parquet",
        manifest="results/finetune_material/{model}/manifest.json",
    log:
        "logs/finetune_material/{model}.log",
    wildcard_constraints:
        model=alternation(finetune_bases()),
    conda:
        ENV
    threads: FT_RES.get("threads", 2)
    resources:
        mem_mb=FT_RES.get("mem_mb", 8000),
        runtime=FT_RES.get("runtime_min", 120),
        gpu=FT_RES.get("gpu", 0),
    params:
        spec=model_spec,
        # only the settings the material depends on: another finetune key (masked_ratio, n_examples, the value of
        # drift_max_score) reruns finetune_data, not this (Snakemake's params rerun trigger)
        finetune=material_settings(FINETUNE),
        generation=config.get("generation"),
        seed=config["seed"],
        judge=lambda w: judge_config("judge")(w) if FT_GRADES_DRIFT else None,
    script:
        "../scripts/finetune_material.py"


rule finetune_data:
    input:
        unpack(finetune_material_input),
        prompt_list=PROMPTS,
    output:
        data="results/finetune/{model}/data.parquet",
        manifest="results/finetune/{model}/data_manifest.json",
    log:
        "logs/finetune_data/{model}.log",
    wildcard_constraints:
        model=alternation(finetuned_models()),
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        spec=model_spec,
        base_spec=base_spec,
        finetune=FINETUNE,
        seed=config["seed"],
    script:
        "../scripts/finetune_data.py"


rule finetune_lora:
    input:
        base_dir=base_dir,
        data="results/finetune/{model}/data.parquet",
        manifest="results/finetune/{model}/data_manifest.json",
    output:
        adapter=directory("resources/finetune/{model}/lora"),
    log:
        "logs/finetune_lora/{model}.log",
    wildcard_constraints:
        model=alternation(finetuned_models()),
    conda:
        ENV
    threads: FT_RES.get("threads", 2)
    resources:
        mem_mb=FT_RES.get("mem_mb", 8000),
        runtime=FT_RES.get("runtime_min", 120),
        gpu=FT_RES.get("gpu", 0),
    params:
        spec=model_spec,
        finetune=FINETUNE,
        seed=config["seed"],
    script:
        "../scripts/finetune_lora.py"


rule merge_lora:
    input:
        base_dir=base_dir,
        adapter="resources/finetune/{model}/lora",
        manifest="results/finetune/{model}/data_manifest.json",
    output:
        model_dir=directory("resources/models/{model}"),
    log:
        "logs/merge_lora/{model}.log",
    wildcard_constraints:
        model=alternation(finetuned_models()),
    conda:
        ENV
    resources:
        mem_mb=FT_RES.get("mem_mb", 8000),
        runtime=30,
    params:
        spec=model_spec,
        base_spec=base_spec,
        finetune=FINETUNE,
        seed=config["seed"],
    script:
        "../scripts/merge_lora.py"


# The masked-ratio sweep as an experiment: base vs every fine-tuned model (exp1 steered, exp8 unsteered), ESR and
# improvement rates with Wilson intervals, the unsteered restart rate as a gate (esr.exp4). Planned by stats_outputs
# when the config has fine-tuned models.
rule summarise_exp4:
    input:
        unpack(lambda w: exp4_trials()),
    output:
        table="results/exp4/summary.parquet",
        csv="results/exp4/summary.csv",
        transcripts="results/exp4/transcripts.json",
        report=report(
            "results/exp4/report.md",
            category="Exp4: fine-tuning (masked-ratio sweep)",
            caption="../report/exp4.rst",
        ),
    log:
        "logs/summarise_exp4.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        models=lambda w: exp4_models(),
    script:
        "../scripts/summarise_exp4.py"

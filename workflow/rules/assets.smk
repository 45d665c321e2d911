# Inputs: the prompt list and the models (hub download at a pinned revision, or the embedded SmolLM2 conversion).
# Rule bodies: esr.stages.assets.


rule fetch_prompts:
    output:
        prompt_list=PROMPTS,
    params:
        prompts=config["prompts"],
    log:
        "logs/fetch_prompts.log",
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/fetch_prompts.py"


rule download_model:
    output:
        model_dir=directory("resources/models/{model}"),
    params:
        spec=model_spec,
    log:
        "logs/download_model/{model}.log",
    resources:
        mem_mb=8000,
        runtime=600,
    conda:
        ENV
    script:
        "../scripts/download_model.py"

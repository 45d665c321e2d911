# Inputs: the prompt list and the models (hub download at a pinned revision, or the embedded SmolLM2 conversion).


rule prompts:
    output:
        "resources/prompts/prompts.txt",
    params:
        prompts=config["prompts"],
    log:
        "logs/prompts.log",
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/fetch_prompts.py"


rule download_model:
    output:
        directory("resources/models/{model}"),
    params:
        spec=model_spec,
        hf_id=lambda w: MODELS[w.model].hf_id,
        revision=lambda w: MODELS[w.model].revision,
    log:
        "logs/download_model/{model}.log",
    resources:
        mem_mb=8000,
        runtime=600,
    conda:
        ENV
    script:
        "../scripts/download_model.py"

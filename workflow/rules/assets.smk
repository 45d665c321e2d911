# Inputs: the prompt list and the models (hub download at a pinned revision, or the embedded SmolLM2 conversion).
# Rule bodies: esr.stages.assets. Both need the network: on a cluster they run on the login node (localrule).


rule fetch_prompts:
    input:
        LOCAL_INPUTS["prompts"],
    output:
        prompt_list=PROMPTS,
    log:
        "logs/fetch_prompts.log",
    localrule: True
    conda:
        ENV
    resources:
        mem_mb=500,
        runtime=10,
    params:
        prompts=config["prompts"],
    script:
        "../scripts/fetch_prompts.py"


rule download_model:
    output:
        model_dir=directory("resources/models/{model}"),
    log:
        "logs/download_model/{model}.log",
    localrule: True
    conda:
        ENV
    resources:
        mem_mb=8000,
        runtime=600,
    params:
        spec=model_spec,
    script:
        "../scripts/download_model.py"

# SAEs. Paper models: fetch the sae-lens release into the local hub cache, and its latent labels. Embedded default:
# build an offline text corpus, collect layer activations, train a TopK SAE, evaluate it and label its latents.
# Rule bodies: esr.stages.sae. fetch_sae and download_labels need the network: login node on a cluster (localrule).


rule fetch_sae:
    output:
        manifest="resources/sae_manifests/{model}.json",
    log:
        "logs/fetch_sae/{model}.log",
    localrule: True
    conda:
        ENV
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        spec=model_spec,
    script:
        "../scripts/fetch_sae.py"


rule download_labels:
    input:
        lambda w: LOCAL_INPUTS[f"labels:{w.model}"],
        sae_manifest=sae_input,
    output:
        csv="resources/labels/{model}.csv",
        manifest="resources/labels/{model}.manifest.json",
    log:
        "logs/download_labels/{model}.log",
    # Latent labels for published SAEs: Neuronpedia exports (ids from sae-lens's directory for the SAE release) or a
    # user-supplied CSV (Goodfire, file).
    wildcard_constraints:
        model=alternation(download_label_models()),
    localrule: True
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        labels=lambda w: MODELS[w.model].labels,
        spec=model_spec,
    script:
        "../scripts/download_labels.py"


rule build_corpus:
    input:
        model_dir=model_dir,
    output:
        corpus=directory("resources/corpus/{model}"),
    log:
        "logs/build_corpus/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=model_spec,
        sae_cfg=config.get("embedded_sae"),
        seed=config["seed"],
    script:
        "../scripts/build_corpus.py"


rule collect_activations:
    input:
        model_dir=model_dir,
        corpus="resources/corpus/{model}",
    output:
        activations=directory("resources/activations/{model}"),
    log:
        "logs/collect_activations/{model}.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=12000,
        runtime=120,
    params:
        spec=model_spec,
        sae_cfg=config.get("embedded_sae"),
    script:
        "../scripts/collect_activations.py"


rule train_sae:
    input:
        activations="resources/activations/{model}",
    output:
        sae=directory("resources/sae/{model}"),
        report="results/sae/{model}/sae_report.json",
        report_md="results/sae/{model}/sae_report.md",
    log:
        "logs/train_sae/{model}.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=12000,
        runtime=120,
    params:
        spec=model_spec,
        sae_cfg=config.get("embedded_sae"),
        seed=config["seed"],
    script:
        "../scripts/train_sae.py"


rule label_latents:
    input:
        model_dir=model_dir,
        sae="resources/sae/{model}",
        activations="resources/activations/{model}",
    output:
        labels="resources/labels/{model}.csv",
    log:
        "logs/label_latents/{model}.log",
    wildcard_constraints:
        model=alternation(embedded_sae_models()),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=12000,
        runtime=60,
    params:
        spec=model_spec,
        sae_cfg=config.get("embedded_sae"),
    script:
        "../scripts/label_latents.py"

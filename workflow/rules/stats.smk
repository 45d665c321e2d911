# Statistics, figures, the cross-judge regrade (exp7), the sequential-activation analysis (exp9), the audit of
# every paper number, and the figures registered for `snakemake --report results/report.html`.


rule cross_judge:
    input:
        trials="results/exp1/{model}/trials.parquet",
        judge_calibration=judge_calibration_input,
    output:
        "results/exp7/{model}/trials.parquet",
    params:
        judges=lambda w: cross_judges(w.model),
        n_samples=config.get("cross_judge", {}).get("n_samples", 0),
        seed=config["seed"],
    log:
        "logs/cross_judge/{model}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    conda:
        ENV
    script:
        "../scripts/cross_judge.py"


rule sequential:
    input:
        model=model_dir,
        sae=sae_input,
        trials=sequential_trials,
        baseline="results/exp8/{model}/trials.parquet",
        detectors=detectors_input,
    output:
        store=directory("results/exp9/{model}/episodes.zarr"),
        baseline_store=directory("results/exp9/{model}/baseline.zarr"),
        analysis="results/exp9/{model}/analysis.json",
        summary="results/exp9/{model}/summary.json",
        window=report(
            "results/exp9/{model}/aligned_window.png",
            category="Sequential activations (exp9)",
            caption="../report/exp9_window.rst",
        ),
        regions=report(
            "results/exp9/{model}/region_means.png",
            category="Sequential activations (exp9)",
            caption="../report/exp9_regions.rst",
        ),
    params:
        spec=model_spec,
        sequential=config.get("sequential"),
        seed=config["seed"],
    log:
        "logs/sequential/{model}.log",
    threads: 4
    resources:
        mem_mb=lambda w: model_resources(w, "mem_mb", 8000),
        runtime=lambda w: model_resources(w, "runtime_min", 120),
        gpu=lambda w: model_resources(w, "gpu", 0),
    conda:
        ENV
    script:
        "../scripts/sequential.py"


rule summarise:
    input:
        "results/{experiment}/{model}/trials.parquet",
    output:
        "results/{experiment}/{model}/summary.json",
    wildcard_constraints:
        experiment="exp1|exp8|exp2|exp3|exp5|exp7|exp10|planted",
    params:
        n_boot=2000,
        seed=config["seed"],
    log:
        "logs/summarise/{experiment}/{model}.log",
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/summarise.py"


rule compare:
    input:
        comparison_inputs,
    output:
        "results/comparisons/{model}.json",
    params:
        n_params={m: s.n_params for m, s in MODELS.items()},
        seed=config["seed"],
    log:
        "logs/compare/{model}.log",
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/compare.py"


rule model_figures:
    input:
        unpack(model_figure_inputs),
    output:
        ablation=report(
            "results/figures/{model}/fig5_ablation.png",
            category="Ablation of off-topic detectors (exp3, exp10)",
            caption="../report/fig5.rst",
        ),
        meta=report(
            "results/figures/{model}/fig4_meta_prompts.png",
            category="Meta-prompts (exp5)",
            caption="../report/fig4.rst",
        ),
        sweep=report(
            "results/figures/{model}/fig3_boost_sweep.png",
            category="Boost sweep (exp2)",
            caption="../report/fig3.rst",
        ),
    log:
        "logs/model_figures/{model}.log",
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/model_figures.py"


rule esr_figure:
    input:
        expand("results/exp1/{model}/trials.parquet", model=MODELS),
    output:
        report(
            "results/figures/fig2_esr_by_model.png",
            category="ESR across models (exp1)",
            caption="../report/fig2.rst",
        ),
    params:
        order=list(MODELS),
    log:
        "logs/esr_figure.log",
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/esr_figure.py"


rule audit:
    input:
        summaries=audit_inputs(),
    output:
        json="results/audit/paper_numbers.json",
        md="results/audit/paper_numbers.md",
        html=report(
            "results/audit/paper_numbers.html",
            category="Audit of every paper number",
            caption="../report/audit.rst",
        ),
        overview=report(
            "results/audit/overview.md",
            category="Audit of every paper number",
            caption="../report/overview.rst",
        ),
    params:
        config=config,
        model_map=config.get("audit", {}).get("model_map", {}),
    log:
        "logs/audit.log",
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/audit.py"

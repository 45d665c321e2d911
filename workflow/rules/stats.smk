# Statistics, figures, the cross-judge regrade (exp7), the sequential-activation analysis (exp9), the audit of
# every paper number, and the figures registered for `snakemake --report results/report.html`.
# Rule bodies: esr.stages.stats.


rule cross_judge:
    input:
        trials=trials_table("exp1", "{model}"),
        judge_anchors=cross_judge_anchors,
    output:
        regraded=trials_table("exp7", "{model}"),
    log:
        "logs/cross_judge/{model}.log",
    # API judges run on the login node (grading.run_on: login), offline ones as cluster jobs
    localrule: CROSS_JUDGE_LOCAL
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        judges=cross_judges,
        n_samples=config.get("cross_judge", {}).get("n_samples", 0),
        seed=config["seed"],
    script:
        "../scripts/cross_judge.py"


rule sequential:
    input:
        model_dir=model_dir,
        sae=sae_input,
        trials=sequential_trials,
        baseline=bundle_ancient(trials_table("exp8", "{model}")),
        detectors=detectors_input,
    output:
        store=directory("results/exp9/{model}/episodes.zarr"),
        baseline_store=directory("results/exp9/{model}/baseline.zarr"),
        analysis="results/exp9/{model}/analysis.json",
        summary=summary_file("exp9", "{model}"),
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
    log:
        "logs/sequential/{model}.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=model_resources("mem_mb", 8000),
        runtime=model_resources("runtime_min", 120),
        gpu=model_resources("gpu", 0),
    params:
        spec=model_spec,
        settings=config.get("sequential"),
        seed=config["seed"],
    script:
        "../scripts/sequential.py"


rule summarise:
    input:
        trials=trials_table("{experiment}", "{model}"),
    output:
        summary=summary_file("{experiment}", "{model}"),
    log:
        "logs/summarise/{experiment}/{model}.log",
    wildcard_constraints:
        experiment=alternation([e for e, x in REGISTRY.items() if x.summary]),
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        n_boot=2000,
        seed=config["seed"],
    script:
        "../scripts/summarise.py"


rule compare:
    input:
        unpack(comparison_inputs),
    output:
        comparisons="results/comparisons/{model}.json",
    log:
        "logs/compare/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        seed=config["seed"],
    script:
        "../scripts/compare.py"


rule specificity:
    input:
        detector_trials=trials_table("exp3", "{model}"),
        control_trials=trials_table("exp10", "{model}"),
    output:
        comparison="results/compare/{model}/exp3_vs_exp10.json",
    log:
        "logs/specificity/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        seed=config["seed"],
    script:
        "../scripts/specificity.py"


rule cross_model:
    input:
        trials=expand(trials_table("exp1", "{model}"), model=SIZE_MODELS),
    output:
        comparison="results/compare/cross_model.json",
    log:
        "logs/cross_model.log",
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        n_params={m: MODELS[m].n_params for m in SIZE_MODELS},
    script:
        "../scripts/cross_model.py"


rule model_figures:
    input:
        unpack(model_figure_inputs),
    output:
        ablation=report(
            "results/figures/{model}/fig5_ablation.png",
            category="Ablation of off-topic detectors (exp3, exp10)",
            caption="../report/fig5.rst",
        ),
        meta_prompts=report(
            "results/figures/{model}/fig4_meta_prompts.png",
            category="Meta-prompts (exp5)",
            caption="../report/fig4.rst",
        ),
        boost_sweep=report(
            "results/figures/{model}/fig3_boost_sweep.png",
            category="Boost sweep (exp2)",
            caption="../report/fig3.rst",
        ),
    log:
        "logs/model_figures/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    script:
        "../scripts/model_figures.py"


rule esr_figure:
    input:
        trials=expand(trials_table("exp1", "{model}"), model=MODELS),
    output:
        figure=report(
            "results/figures/fig2_esr_by_model.png",
            category="ESR across models (exp1)",
            caption="../report/fig2.rst",
        ),
    log:
        "logs/esr_figure.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        order=list(MODELS),
    script:
        "../scripts/esr_figure.py"


rule audit:
    input:
        summaries=audit_inputs(),
        exp4=exp4_outputs(),
    output:
        table_json="results/audit/paper_numbers.json",
        table_md="results/audit/paper_numbers.md",
        table_html=report(
            "results/audit/paper_numbers.html",
            category="Audit of every paper number",
            caption="../report/audit.rst",
        ),
        overview=report(
            "results/audit/overview.md",
            category="Audit of every paper number",
            caption="../report/overview.rst",
        ),
    log:
        "logs/audit.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        config=config,
        model_map=config.get("audit", {}).get("model_map", {}),
    script:
        "../scripts/audit.py"

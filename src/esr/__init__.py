"""esr: reproduce "Endogenous Resistance to Activation Steering in Language Models" (arXiv 2602.06941).

Where things live, one module per concept:

Testing your own model (``esr probe`` on the command line)

- ``esr.probe(model, sae=..., judge=...) -> ProbeResult``  the protocol in small on any HF causal LM (``esr.probing``)
- ``esr.load_model``, ``esr.load_sae``, ``esr.steer``        the lower-level API (``esr.api``)

Workflow stages (one function per Snakemake rule, named after it; ``workflow/scripts/<rule>.py`` is one call)

- ``esr.stages``              ``run_rule`` (binds a rule's inputs, outputs, params by name), ``model_stage``, logging
- ``esr.stages.assets``       rules of ``assets.smk``: the prompt list, the models
- ``esr.stages.sae``          rules of ``sae.smk``: paper SAEs and labels; embedded corpus, activations, SAE, labels
- ``esr.stages.experiments``  rules of ``experiments.smk``: selection, detectors, calibration, generation, grading
- ``esr.stages.stats``        rules of ``stats.smk``: cross-judge, exp9 replay, summaries, comparisons, figures, audit

Science

- ``esr.steering``     the interventions as forward hooks: steer (add ``boost * W_dec[latent]``), ablate, capture
- ``esr.generation``   batched steered sampling on transformers or DeepSpeed inference, seeded per row
- ``esr.models``       model + tokenizer loading (Llama-3, Gemma-2, SmolLM2) from a local HF directory
- ``esr.sae``          SAE loading through sae-lens; a boost (raw or x median residual norm) -> steering vector
- ``esr.readout``      SAE latent activations from one forward pass over given texts, without generating
- ``esr.latents``      latent selection: labels table, filters, seeded candidate draw, prompts and seeds per latent
- ``esr.detectors``    off-topic-detector latents: discovery, the paper's sets, matched random controls
- ``esr.calibration``  per-latent boost thresholds by probabilistic bisection, fully keyed cache, resumable shards
- ``esr.experiments``  the experiment registry (exp1-exp10) and each experiment's trial plan
- ``esr.episodes``     self-correction and baseline episodes and their region boundaries in characters and tokens
- ``esr.sequential``   per-token activation analysis around self-corrections (exp6/exp9), its plots
- ``esr.activations``  the per-token SAE activation store (chunked Zarr v3 through xarray), validated on open

Judging (``esr.judge``: split answers into scored attempts; grade latent labels for concreteness)

- ``esr.judge.base``           requests, results, counters; the ``Judge`` base class (cache, concurrency, batches)
- ``esr.judge.http_backends``  LLM judges over httpx: Anthropic Messages, OpenAI-compatible Chat Completions
- ``esr.judge.offline``        the offline MiniLM relevance judge of the embedded default (an approximation)
- ``esr.judge.fake``           a deterministic fake judge for unit tests
- ``esr.judge.concreteness``   label concreteness graders: an LLM, or an offline WordNet heuristic
- ``esr.judge.wordnet``        a minimal reader of the WordNet database files
- ``esr.judge.segmentation``   restart phrases: finding them, splitting an answer into attempts
- ``esr.judge.parsing``        strict parsing of judge replies
- ``esr.judge.prompts``        our judge prompts and their version strings
- ``esr.judge.cache``          the content-addressed judge cache
- ``esr.judge.factory``        judges and concreteness graders from config blocks

Statistics

- ``esr.trials``     the trials table: its schema, one row per trial from plan to audit, the score columns
- ``esr.metrics``    inclusion rules, per-trial metrics, rates and means with Wald, Wilson and bootstrap intervals
- ``esr.stats``      the tests the paper did not run: McNemar, Fisher, relative change, Holm, size trend, kappa
- ``esr.summaries``  trials tables -> summary cells and comparisons
- ``esr.audit``      every number of the paper against a run's summary cells, with a verdict each
- ``esr.figures``    figures in the spirit of the paper's (PNG plus a JSON sidecar of the plotted numbers)
- ``esr.report``     the run overview and the fidelity notes (where a run deviates from the paper or the authors)
- ``esr.fidelity``   the registry of every deviation from the paper or the authors' code, read from the config
- ``esr.preflight``  checks of the configured input files when the workflow loads, before any job runs
- ``esr.progress``   progress lines with rate and ETA for long stages (in each rule's log)
- ``esr.recovery``   after a killed run: removes the temporary files of killed jobs on the next run
- ``esr.bundle``     results bundles: export a run's results, import and verify them to audit without GPUs

Plumbing

- ``esr.config``        config loading, schema validation, the model registry
- ``esr.io``            atomic writes, stable hashes, derived seeds
- ``esr.provenance``    the provenance block every result carries
- ``esr.ranks``         rank helpers for tensor-parallel stages: who writes, how the writer's values reach every rank
- ``esr.distributed``   launching a model stage as tensor-parallel ranks under torchrun
- ``esr.assets``        model download (hub, pinned revision), the embedded SmolLM2 conversion, prompt lists
- ``esr.corpus``        offline English text (from Debian packages) for training the embedded SAE
- ``esr.sae_training``  the embedded SAE: activations, TopK training with sae-lens, evaluation, automatic labels
- ``esr.labels``        labels of the paper SAEs (Neuronpedia, Goodfire, a file): download, normalise, count
- ``esr.cli``           the ``esr`` command: ``esr probe``, ``esr steer``, ``esr latents search``, ``esr bundle``
- ``esr.testing``       tiny offline models, SAEs and a tokenizer for tests and benchmarks

Package data: ``esr/data/paper_numbers.yaml`` (the paper's numbers the audit checks) and
``esr/templates/audit.html.j2`` (the audit page).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("esr")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # a plain checkout on sys.path, not installed
    __version__ = "0+unknown"

#: The public API, imported on first use (``import esr`` stays light: no torch until one of these is touched).
_PROBING = ("probe", "ProbeResult", "ProbeSettings")
_API = ("load_model", "load_sae", "steer")
__all__ = ["__version__", *_PROBING, *_API]


def __getattr__(name: str):
    if name in _PROBING:
        from esr import probing

        return getattr(probing, name)
    if name in _API:
        from esr import api

        return getattr(api, name)
    raise AttributeError(f"module 'esr' has no attribute {name!r}")

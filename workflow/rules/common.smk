# Config validation and input functions shared by all rule files. The experiments, their conditions and what makes
# their trials come from the registry esr.experiments.REGISTRY.
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# The library lives in src/; it is pip-installed (editable) by `make setup`, and this makes a plain checkout work.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from esr.config import ConfigError, model_specs, validate_config  # noqa: E402
from esr.experiments import REGISTRY  # noqa: E402
from esr.judge.factory import (  # noqa: E402
    API_BACKENDS,
    anchors_file,
    auto_anchors,
    resolved_judge,
)
from esr.preflight import check_inputs, local_inputs  # noqa: E402
from esr.stages.finetune import material_settings  # noqa: E402

try:
    validate_config(config)  # the one validation: JSON schema (names the offending key) + cross-key checks
    if workflow.is_main_process:  # input files (prompts, label CSVs, SAE and model folders), before any job runs
        check_inputs(config, root=Path.cwd())
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
LOCAL_INPUTS = local_inputs(config)
# A results bundle imported here (esr.bundle): model rules never rerun, exp9's shipped replay stands.
BUNDLE_IMPORTED = Path("bundle/manifest.json").is_file()

MODELS = model_specs(config)
# The models of the cross-model size trend: fine-tuned models (exp4) share their base model's size and are left out.
SIZE_MODELS = [m for m, s in MODELS.items() if s.source != "finetuned"]
ENV = "../../envs/esr.yaml"
EXP = config.get("experiments", {})
PROMPTS = "resources/prompts/prompts.txt"
# Job shaping (README "Running the paper's models on a cluster"): generation/calibration shards per model, grading
# jobs per (experiment, model, condition), and which rules run on the login node (they need the network).
SHARDS_PER_MODEL = config.get("latent_shards_per_model", {})
GRADING = config.get("grading", {})
if set(SHARDS_PER_MODEL) - set(MODELS):
    raise WorkflowError(
        f"invalid configuration: latent_shards_per_model names {sorted(set(SHARDS_PER_MODEL) - set(MODELS))}, "
        f"which are not models of this config (models: {sorted(MODELS)})"
    )


def n_shards(model):
    """Generation and calibration jobs per (experiment, condition) of ``model``: ``latent_shards_per_model.<model>``,
    else (a fine-tuned model, exp4) its base model's, else ``latent_shards``."""
    default = SHARDS_PER_MODEL.get(MODELS[model].base_model, config.get("latent_shards", 1))
    return int(SHARDS_PER_MODEL.get(model, default))


def shards(model):
    return list(range(n_shards(model)))


def grading_groups(model):
    """The generation shards each grade job of ``model`` grades: ``grading.shards`` contiguous groups per
    (experiment, condition), at most one per generation shard (default 1: one grade job per condition)."""
    n = n_shards(model)
    g = min(int(GRADING.get("shards", 1)), n)
    return [list(range(i * n // g, (i + 1) * n // g)) for i in range(g)]


def on_login_node(*blocks):
    """Whether a job calling these judge blocks runs on the login node (a localrule) - when one of them calls a
    remote API and ``grading.run_on`` is ``login`` (compute nodes often have no internet)."""
    api = any((b or {}).get("backend") in API_BACKENDS for b in blocks)
    return bool(api and GRADING.get("run_on", "login") == "login")


def alternation(names):
    """A wildcard constraint matching exactly ``names`` (never matches when empty)."""
    return "|".join(re.escape(n) for n in names) or "^$"


def experiments_made_by(*rules):
    return [name for name, e in REGISTRY.items() if e.made_by in rules]


def model_spec(wildcards):
    return MODELS[wildcards.model]


def model_dir(wildcards):
    """Directory holding the model's weights and tokenizer (made by download_model, or a local path)."""
    return MODELS[wildcards.model].local_dir


def model_resources(key, default):
    """A per-model resource (``models.<m>.resources.<key>``) as a Snakemake resource callable."""
    return lambda wildcards: config["models"][wildcards.model].get("resources", {}).get(key, default)


def sae_owner(model):
    """The model whose SAE and labels ``model`` uses: its base model for a fine-tuned model (exp4: steered and read
    with the base model's SAE, as the authors did), else itself."""
    spec = MODELS[model]
    return spec.base_model if spec.source == "finetuned" else model


def embedded_sae_models():
    return [m for m, s in MODELS.items() if s.sae.source == "embedded" and sae_owner(m) == m]


def download_label_models():
    """Models whose latent labels are downloaded (Neuronpedia / Goodfire / file) rather than made here."""
    return [m for m, s in MODELS.items() if s.labels.get("source", "auto") != "auto" and sae_owner(m) == m]


def sae_lens_models():
    return [m for m, s in MODELS.items() if s.sae.source == "sae_lens" and sae_owner(m) == m]


def sae_input(wildcards):
    """The model's SAE as an input: the embedded SAE folder, or the sae-lens fetch manifest (a fine-tuned model's:
    its base model's, ``sae_owner``)."""
    spec, owner = MODELS[wildcards.model], sae_owner(wildcards.model)
    if spec.sae.source == "embedded":
        return f"resources/sae/{owner}"
    if spec.sae.source == "sae_lens":
        return f"resources/sae_manifests/{owner}.json"
    return spec.sae.path


# ------------------------------------------------------------------------------------------------ exp4 fine-tuning
FINETUNE = config.get("finetune") or {}
FT_RES = FINETUNE.get("resources") or {}


def finetuned_models():
    """Models with source: finetuned (made by workflow/rules/finetune.smk from their base_model)."""
    return [m for m, s in MODELS.items() if s.source == "finetuned"]


def finetune_bases():
    """The base models of the fine-tuned models (each gets one finetune_material job, shared by its fine-tunes)."""
    return list(dict.fromkeys(MODELS[m].base_model for m in finetuned_models()))


def finetune_material_input(wildcards):
    """A fine-tuned model's shared material: its base model's finetune_material outputs, by role."""
    base = f"results/finetune_material/{MODELS[wildcards.model].base_model}"
    return {"answers": f"{base}/answers.parquet", "drift": f"{base}/drift.parquet", "material": f"{base}/manifest.json"}


def finetune_drift_input(wildcards):
    """finetune.drift_file as an input of finetune_material when finetune.drift_source is file."""
    return [FINETUNE["drift_file"]] if FINETUNE.get("drift_source") == "file" and FINETUNE.get("drift_file") else []


# finetune.drift_max_score set and the drift generated here: finetune_material grades the drift with the `judge`
# block (resolved as for the grade rule, so `anchors: auto` is the base model's anchor file) and the base model's
# labels. A drift_file is not graded: it must carry its own score column (esr.stages.finetune.finetune_material).
FT_GRADES_DRIFT = FINETUNE.get("drift_max_score") is not None and FINETUNE.get("drift_source") != "file"


def finetune_drift_judge_inputs(wildcards):
    """The drift judge's inputs of finetune_material (the base model's labels and, for `anchors: auto`, its anchor
    file) when it grades the drift (FT_GRADES_DRIFT), else none."""
    if not FT_GRADES_DRIFT:
        return {}
    return {"labels": labels_input(wildcards), "judge_anchors": judge_anchors_input("judge")(wildcards)}


def base_spec(wildcards):
    return MODELS[MODELS[wildcards.model].base_model]


def base_dir(wildcards):
    return base_spec(wildcards).local_dir


def base_sae(wildcards):
    """The base model's SAE as an input (the fine-tuned model is steered with it, as the authors did)."""
    from types import SimpleNamespace

    return sae_input(SimpleNamespace(model=MODELS[wildcards.model].base_model))


def labels_input(wildcards):
    return f"resources/labels/{sae_owner(wildcards.model)}.csv"


def finetune_manifest_input(wildcards):
    """exp4: a fine-tuned model's finetune_data manifest (its trials use only the evaluation prompts it records)."""
    return [f"results/finetune/{wildcards.model}/data_manifest.json"] if wildcards.model in finetuned_models() else []


def exp4_outputs():
    """exp4's sweep summary, planned when the config has fine-tuned models (finetune.enabled)."""
    return ["results/exp4/summary.parquet"] if finetuned_models() else []


def exp4_models():
    """exp4's models, bases first: name -> base_model and masked_ratio (None for a base model; a fine-tuned entry
    without its own ratio has finetune.masked_ratio)."""
    fts = finetuned_models()
    out = {b: {"base_model": None, "masked_ratio": None} for b in dict.fromkeys(MODELS[f].base_model for f in fts)}
    for f in fts:
        ratio = MODELS[f].masked_ratio
        out[f] = {
            "base_model": MODELS[f].base_model,
            "masked_ratio": FINETUNE.get("masked_ratio") if ratio is None else ratio,
        }
    return out


def exp4_trials():
    """exp1 (steered) and exp8 (unsteered) trials of every fine-tuned model and its base, by role, and the
    fine-tuned models' finetune_data manifests (their evaluation prompts: the base rows are counted on them too)."""
    models = list(exp4_models())
    out = {"steered": [trials_table("exp1", m) for m in models]}
    out["manifests"] = [f"results/finetune/{m}/data_manifest.json" for m in models if m in finetuned_models()]
    if all(conditions(m, "exp8") for m in models):
        out["unsteered"] = [trials_table("exp8", m) for m in models]
    return out


def detectors_input(wildcards):
    return f"results/detectors/{wildcards.model}/detectors.json"


def ablated_sets(wildcards):
    """The detector sets exp3 ablates for the model (exp10's controls are matched to each, by default)."""
    return conditions(wildcards.model, "exp3")


# ------------------------------------------------------------------------------------------------ judges
def judge_block(key):
    """A judge block (``judge``: grades trials; ``threshold_judge``: scores the boost search, default ``judge``)."""
    return config.get(key) or config["judge"]


def judge_config(key="judge"):
    return lambda wildcards: resolved_judge(judge_block(key), wildcards.model)


def judge_anchors_input(key="judge"):
    """The model's anchor file as an input, when the judge block uses ``anchors: auto``."""
    return lambda wildcards: anchors_file(wildcards.model) if auto_anchors(judge_block(key)) else []


def cross_judges(wildcards):
    """The exp7 judges for one model (``auto`` anchors become this model's anchor file)."""
    judges = config.get("cross_judge", {}).get("judges", {})
    return {name: resolved_judge(block, wildcards.model) for name, block in judges.items()}


def cross_judge_anchors(wildcards):
    judges = config.get("cross_judge", {}).get("judges", {})
    return [anchors_file(wildcards.model)] if any(auto_anchors(b) for b in judges.values()) else []


# API grading on the login node unless grading.run_on: cluster (calibrate_boosts and select_latents also call an API
# judge when configured so, but they need the GPU: their compute nodes need outbound HTTPS, e.g. via HTTPS_PROXY).
GRADE_LOCAL = on_login_node(config.get("judge"))
CROSS_JUDGE_LOCAL = on_login_node(*config.get("cross_judge", {}).get("judges", {}).values())


# ------------------------------------------------------------------------------------------------ experiments
def conditions(model, experiment):
    """The conditions an experiment runs for a model (e.g. the detector sets ablated in exp3); [] = not run."""
    return REGISTRY[experiment].conditions(config, MODELS[model])


def experiments_for(model, *made_by):
    """The experiments a model runs (those made by the given rules; all when none are given)."""
    names = experiments_made_by(*made_by) if made_by else list(REGISTRY)
    return [e for e in names if conditions(model, e)]


def graded_shards(wildcards):
    """Every graded table of an experiment and model: one per condition and grading group."""
    groups = range(len(grading_groups(wildcards.model)))
    return [
        f"results/{wildcards.experiment}/{wildcards.model}/shards/{c}/graded-{g}.parquet"
        for c in conditions(wildcards.model, wildcards.experiment)
        for g in groups
    ]


def generated_for_grading(wildcards):
    """The generation shards grading group ``{shard}`` of a condition grades (``grading_groups``)."""
    base = f"results/{wildcards.experiment}/{wildcards.model}/shards/{wildcards.condition}"
    return [f"{base}/gen-{s}.parquet" for s in grading_groups(wildcards.model)[int(wildcards.shard)]]


def trials_table(experiment, model):
    return f"results/{experiment}/{model}/trials.parquet"


def experiment_outputs():
    out = []
    for m in MODELS:
        out += [
            f"results/selection/{m}/selection.json",
            f"results/calibration/{m}/thresholds.parquet",
            f"results/activations/{m}/exp1.zarr",
        ]
        out += [trials_table(e, m) for e in experiments_for(m, "generate", "plant_restarts")]
    return out


# ------------------------------------------------------------------------------------------------ statistics
def bundle_ancient(path):
    """``path`` as an ancient input in an imported results bundle (a regrade does not replay exp9 without weights)."""
    return ancient(path) if BUNDLE_IMPORTED else path


def sequential_trials(wildcards):
    """exp9's episode pool: exp1 trials (+ the labelled planted positive control where enabled)."""
    tables = [trials_table(e, wildcards.model) for e in ("exp1", "planted") if conditions(wildcards.model, e)]
    return [bundle_ancient(t) for t in tables]


def comparison_inputs(wildcards):
    """exp1 and every experiment registered with ``compare``, by experiment name."""
    names = ["exp1"] + [e for e in experiments_for(wildcards.model) if REGISTRY[e].compare]
    return {e: trials_table(e, wildcards.model) for e in names}


def model_figure_inputs(wildcards):
    """exp1 and every experiment registered with a ``figure``, by experiment name."""
    names = ["exp1"] + [e for e in experiments_for(wildcards.model) if REGISTRY[e].figure]
    return {e: trials_table(e, wildcards.model) for e in names}


def summary_file(experiment, model):
    return f"results/{experiment}/{model}/summary.json"


def cross_model_outputs():
    """The cross-model trend test: planned only with two or more models (one model has no trend to test)."""
    return ["results/compare/cross_model.json"] if len(SIZE_MODELS) >= 2 else []


def specificity_outputs(model):
    """exp3 vs exp10 for a model that runs both (detector ablation vs matched random ablation)."""
    runs = conditions(model, "exp3") and conditions(model, "exp10")
    return [f"results/compare/{model}/exp3_vs_exp10.json"] if runs else []


def stats_outputs():
    out = ["results/audit/paper_numbers.json", "results/figures/fig2_esr_by_model.png"]
    out += cross_model_outputs() + exp4_outputs()
    for m in MODELS:
        out += [
            f"results/comparisons/{m}.json",
            f"results/figures/{m}/fig5_ablation.png",
            f"results/exp9/{m}/analysis.json",
        ]
        out += specificity_outputs(m)
    return out


def audit_inputs():
    return [summary_file(e, m) for m in MODELS for e in experiments_for(m)]


def all_outputs():
    """Everything the workflow builds: prompts, models, SAEs (+ report and labels for embedded SAEs), every
    experiment's trials table, statistics, figures and the audit."""
    out = [PROMPTS]
    out += [f"resources/models/{m}" for m, s in MODELS.items() if s.source != "local"]
    out += [f"resources/sae_manifests/{m}.json" for m in sae_lens_models()]
    for m in embedded_sae_models():
        out += [f"results/sae/{m}/sae_report.json", f"resources/labels/{m}.csv"]
    if "experiments" in config:
        out += experiment_outputs() + stats_outputs()
    return out

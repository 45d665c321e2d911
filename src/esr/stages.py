"""Stage entry points: one function per Snakemake rule body, importable and testable without Snakemake.

Each takes plain arguments (paths, config blocks) and writes its outputs atomically with provenance; the scripts in
``workflow/scripts/`` only unpack the ``snakemake`` object and call these."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch

from esr.config import ModelSpec
from esr.io import atomic_path, write_json, write_text
from esr.provenance import provenance

log = logging.getLogger("esr")


@contextlib.contextmanager
def stage_logging(log_path: str | Path | None, threads: int | None = None) -> Iterator[None]:
    """Send the stage's logging (and warnings) to ``log_path`` and stderr; set torch's thread count."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    logging.captureWarnings(True)
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    try:
        yield
    except Exception:
        log.exception("stage failed")
        raise
    finally:
        log.info("stage finished in %.1f s", time.time() - start)


def _load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _chat_formatter(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        return None

    def fmt(user: str, assistant: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": assistant}], tokenize=False)
    return fmt


# --------------------------------------------------------------------------------------------------- assets

def prepare_model_stage(spec: ModelSpec, out_dir: str | Path) -> None:
    from esr.assets import prepare_model

    prepare_model(spec, out_dir)


def prompts_stage(prompts_cfg: dict[str, Any], out: str | Path) -> None:
    from esr.assets import fetch_prompts

    fetch_prompts(prompts_cfg["source"], prompts_cfg["path"], out, url=prompts_cfg.get("url"),
                  sha256=prompts_cfg.get("sha256"))


def fetch_sae_stage(spec: ModelSpec, out_json: str | Path) -> None:
    """Make sure a sae-lens release SAE is in the local hub cache (it is loaded from there later, offline) and
    record what was fetched."""
    from sae_lens import SAE

    sae = SAE.from_pretrained(spec.sae.release, spec.sae.sae_id, device="cpu")
    write_json(out_json, {"model": spec.name, "sae": spec.sae.ident, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                          "architecture": sae.cfg.architecture(), "hook_name": sae.cfg.metadata.hook_name,
                          "boost_unit": spec.sae.boost_unit,
                          "provenance": provenance(model=spec.name, sae=spec.sae.ident)})


# --------------------------------------------------------------------------------------------------- embedded SAE

def corpus_stage(spec: ModelSpec, model_dir: str | Path, sae_cfg: dict[str, Any], seed: int,
                 out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    from esr.io import derive_seed
    from esr.sae_training import build_token_rows

    tok = _load_tokenizer(model_dir)
    total = int((sae_cfg["train_tokens"] + sae_cfg["heldout_tokens"]) * sae_cfg["seq_len"]
                / (sae_cfg["seq_len"] - 1) * 1.02)
    rows, manifest = build_token_rows(tok, sae_cfg["corpus_mix"], total, sae_cfg["seq_len"],
                                      derive_seed(seed, spec.name, "corpus"), _chat_formatter(tok))
    log.info("corpus: %d rows x %d tokens; by source %s; missing %s", manifest.n_rows, manifest.seq_len,
             manifest.tokens_by_source, manifest.missing_sources or "none")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file({"rows": rows}, str(tmp / "rows.safetensors"))
        write_json(tmp / "manifest.json", {**asdict(manifest), "degraded": bool(manifest.missing_sources),
                                           "provenance": provenance(model=spec.name, seed=seed)})


def collect_stage(spec: ModelSpec, model_dir: str | Path, corpus_dir: str | Path, sae_cfg: dict[str, Any],
                  out_dir: str | Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from esr.models import cpu_supports_bf16
    from esr.sae_training import (ActivationStats, collect_layer_activations, filter_activations,
                                  save_activations, truncate_after_layer)

    rows = load_file(str(Path(corpus_dir) / "rows.safetensors"))["rows"]
    dtype = torch.bfloat16 if sae_cfg["collect_dtype"] == "bfloat16" and cpu_supports_bf16() else torch.float32
    if sae_cfg["collect_dtype"] == "bfloat16" and dtype != torch.bfloat16:
        log.warning("this CPU has no bf16 units: collecting in float32 (slower, same result up to rounding)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    truncate_after_layer(model, spec.sae_layer)
    acts = collect_layer_activations(model, rows, spec.sae_layer, sae_cfg["batch_size"])
    kept, index, fstats = filter_activations(acts, sae_cfg["outlier_norm_factor"])
    stats = ActivationStats(n_rows=rows.shape[0], seq_len=rows.shape[1], d_model=acts.shape[-1],
                            n_kept=kept.shape[0], layer=spec.sae_layer, dtype=str(dtype).replace("torch.", ""),
                            **fstats)
    log.info("kept %d activations (median norm %.1f, %d outliers dropped)", stats.n_kept, stats.median_resid_norm,
             stats.n_outliers_dropped)
    save_activations(out_dir, kept, index, rows, stats)


def train_sae_stage(spec: ModelSpec, acts_dir: str | Path, sae_cfg: dict[str, Any], seed: int,
                    out_dir: str | Path, report_json: str | Path, report_md: str | Path) -> None:
    from sae_lens import SAE

    from esr.io import derive_seed
    from esr.sae_training import (SAE_STATS_FILE, evaluate_sae, load_activations,
                                  sae_report_markdown, train_topk_sae)

    acts, _index, _rows, act_stats = load_activations(acts_dir)
    n_held = sae_cfg["heldout_tokens"]
    if acts.shape[0] <= n_held + 10 * sae_cfg["train_batch_tokens"]:
        raise ValueError(f"{acts_dir} holds {acts.shape[0]} activations: too few for heldout_tokens={n_held}")
    train = acts[: min(acts.shape[0] - n_held, sae_cfg["train_tokens"])]
    heldout = acts[-n_held:]
    t0 = time.time()
    sae_seed = derive_seed(seed, spec.name, "sae")
    trained = train_topk_sae(train, sae_cfg["d_sae"], sae_cfg["k"], sae_cfg["lr"], sae_cfg["train_batch_tokens"],
                             sae_seed, spec.sae_layer, spec.hf_id)
    train_seconds = time.time() - t0
    train_info = {"k": sae_cfg["k"], "train_tokens": int(train.shape[0]), "train_seconds": train_seconds,
                  "seed": sae_seed, "lr": sae_cfg["lr"], "batch_tokens": sae_cfg["train_batch_tokens"]}
    with atomic_path(out_dir) as tmp:
        trained.save_inference_model(tmp)
        write_json(tmp / SAE_STATS_FILE, {
            "median_resid_norm": act_stats["median_resid_norm"], "median_resid_norm_layer": act_stats["layer"],
            "sae_layer": spec.sae_layer, "model": spec.name, "hf_id": spec.hf_id, "train": train_info,
            "activation_stats": act_stats, "provenance": provenance(model=spec.name, seed=seed)})
    sae = SAE.load_from_disk(str(out_dir))  # the loader every later stage uses
    ev = evaluate_sae(sae, heldout)
    log.info("SAE: explained variance %.3f, L0 %.1f, dead %.2f%%", ev.explained_variance, ev.l0,
             100 * ev.dead_fraction)
    write_json(report_json, {"model": spec.name, "sae_path": str(out_dir), "evaluation": asdict(ev),
                             "training": train_info, "activations": act_stats,
                             "provenance": provenance(sae_config=sae_cfg, model=spec.name, seed=seed)})
    write_text(report_md, sae_report_markdown(spec.name, ev, act_stats, train_info))


def label_stage(spec: ModelSpec, model_dir: str | Path, sae_dir: str | Path, acts_dir: str | Path,
                sae_cfg: dict[str, Any], out_csv: str | Path) -> None:
    from sae_lens import SAE

    from esr.sae_training import label_latents, load_activations, write_labels_csv

    acts, index, rows, _ = load_activations(acts_dir)
    n = min(sae_cfg["label_tokens"], acts.shape[0])
    sae = SAE.load_from_disk(str(sae_dir))
    labels = label_latents(sae, acts[:n], index[:n], rows, _load_tokenizer(model_dir), sae_cfg["label_top_k"])
    n_live = sum(1 for l in labels if l.label)
    log.info("labelled %d latents (%d live) from %d tokens", len(labels), n_live, n)
    write_labels_csv(out_csv, labels)

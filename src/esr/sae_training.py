"""The embedded SAE: build a token corpus, collect residual-stream activations, train a TopK SAE with sae-lens,
evaluate it on held-out activations, and label every latent from its top-activating tokens.

Key choices of the recipe, each recorded in the outputs:
- activations are the output of decoder block ``layer`` (``hidden_states[layer+1]``), collected from a model
  truncated after that block, in bf16 where the CPU supports it (cosine 0.9999 to fp32);
- position 0 of every row and attention-sink tokens (norm > ``outlier_norm_factor`` x median) are dropped;
- the last ``heldout_tokens`` activations are never trained on and serve the evaluation;
- the SAE is saved with sae-lens ``save_inference_model`` and loaded back with ``SAE.load_from_disk`` - the same
  loader family as the paper's SAEs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esr.corpus import available_mix, source_documents
from esr.io import atomic_path, write_json
from esr.progress import progress

log = logging.getLogger(__name__)
ACTS_FILE = "acts.safetensors"
SAE_STATS_FILE = "esr_stats.json"


# --------------------------------------------------------------------------------------------- corpus -> rows


@dataclass
class CorpusManifest:
    total_tokens: int
    seq_len: int
    n_rows: int
    tokens_by_source: dict[str, int]
    docs_by_source: dict[str, int]
    mix_requested: dict[str, float]
    mix_used: dict[str, float]
    missing_sources: list[str]
    seed: int


def build_token_rows(
    tokenizer,
    mix: dict[str, float],
    total_tokens: int,
    seq_len: int,
    seed: int,
    chat_format: Callable[[str, str], str] | None = None,
) -> tuple[torch.Tensor, CorpusManifest]:
    """Draw documents from each source up to its token share, shuffle, join with the EOS token and pack into rows
    of ``seq_len`` tokens. Returns (rows [n_rows, seq_len] int32, manifest)."""
    used, missing = available_mix(mix)
    rng = random.Random(seed)
    sep = tokenizer.eos_token_id
    docs: list[tuple[str, list[int]]] = []
    tokens_by_source: dict[str, int] = {}
    docs_by_source: dict[str, int] = {}
    for source, share in used.items():
        budget = int(share * total_tokens * 1.02) + seq_len
        texts = [d.text for d in source_documents(source, chat_format)]
        rng.shuffle(texts)
        got = 0
        n = 0
        for start in range(0, len(texts), 256):
            if got >= budget:
                break
            batch = texts[start : start + 256]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if got >= budget:
                    break
                docs.append((source, ids))
                got += len(ids) + 1
                n += 1
        if got < budget:
            log.warning("corpus source %r has only %d of the %d tokens its share asks for", source, got, budget)
        tokens_by_source[source] = got
        docs_by_source[source] = n
    rng.shuffle(docs)
    flat: list[int] = []
    for _, ids in docs:
        flat.extend(ids)
        flat.append(sep)
    n_rows = len(flat) // seq_len
    rows = torch.tensor(flat[: n_rows * seq_len], dtype=torch.int32).view(n_rows, seq_len)
    manifest = CorpusManifest(
        total_tokens=int(rows.numel()),
        seq_len=seq_len,
        n_rows=n_rows,
        tokens_by_source=tokens_by_source,
        docs_by_source=docs_by_source,
        mix_requested=dict(mix),
        mix_used=used,
        missing_sources=missing,
        seed=seed,
    )
    return rows, manifest


# --------------------------------------------------------------------------------------------- activations


def truncate_after_layer(model, layer: int):
    """Keep decoder blocks 0..layer (in place) so a forward pass stops being useful work after ``layer``."""
    from esr.models import decoder_layers

    layers = decoder_layers(model)  # any decoder-only HF causal LM (Llama, Qwen2, Gemma, GPT-NeoX, ...)
    if layer >= len(layers):
        raise ValueError(f"layer {layer} is outside the model's {len(layers)} decoder layers")
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layers:
                setattr(parent, name, torch.nn.ModuleList(list(layers)[: layer + 1]))
                # the config states the new depth, so the block list is still found by its length
                model.config.get_text_config().num_hidden_layers = layer + 1
                return model
    raise TypeError(f"{type(model).__name__}: the decoder block list has no parent module to replace it in")


@torch.no_grad()
def collect_layer_activations(
    model, rows: torch.Tensor, layer: int, batch_size: int = 32, desc: str = "collecting activations"
) -> torch.Tensor:
    """Output of decoder block ``layer`` for every token of ``rows``: [n_rows, seq_len, d_model] in the model's
    dtype. ``model`` may be truncated after ``layer`` (see ``truncate_after_layer``)."""
    captured: list[torch.Tensor] = []
    from esr.models import decoder_layers

    block = decoder_layers(model)[layer]

    def hook(_module, _inputs, output):
        hs = output[0] if isinstance(output, tuple) else output
        captured.append(hs.detach())

    handle = block.register_forward_hook(hook)
    # the decoder stack without the LM head (``model.model`` for Llama, ``model.gpt_neox`` for GPT-NeoX, ...)
    base = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    out = []
    try:
        starts = range(0, rows.shape[0], batch_size)
        for start in progress(starts, desc=desc, unit="batches", min_interval_s=10.0):
            ids = rows[start : start + batch_size].long()
            captured.clear()
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            out.append(captured[0].clone())
    finally:
        handle.remove()
    return torch.cat(out)


@dataclass
class ActivationStats:
    n_rows: int
    seq_len: int
    d_model: int
    n_kept: int
    n_position0_dropped: int
    n_outliers_dropped: int
    median_resid_norm: float
    norm_quantiles: dict[str, float]
    outlier_threshold: float
    layer: int
    dtype: str


def filter_activations(acts: torch.Tensor, outlier_factor: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Drop position 0 and attention-sink outliers. Returns (acts [N, d], index [N, 2] = (row, pos), stats)."""
    n_rows, seq_len, d = acts.shape
    body = acts[:, 1:, :]
    norms = body.float().norm(dim=-1)
    median = float(norms.median())
    threshold = outlier_factor * median
    keep = norms <= threshold
    rows_idx, pos_idx = torch.nonzero(keep, as_tuple=True)
    kept = body[rows_idx, pos_idx]
    index = torch.stack([rows_idx, pos_idx + 1], dim=1).to(torch.int32)
    qs = torch.quantile(norms.flatten()[:: max(1, norms.numel() // 200_000)], torch.tensor([0.01, 0.5, 0.99]))
    stats = {
        "n_position0_dropped": n_rows,
        "n_outliers_dropped": int((~keep).sum()),
        "median_resid_norm": median,
        "outlier_threshold": threshold,
        "norm_quantiles": {"q01": float(qs[0]), "q50": float(qs[1]), "q99": float(qs[2])},
    }
    return kept, index, stats


def save_activations(
    path: str | Path, acts: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, stats: ActivationStats
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        save_file(
            {"acts": acts.contiguous(), "index": index.contiguous(), "rows": rows.contiguous()}, str(tmp / ACTS_FILE)
        )
        write_json(tmp / "stats.json", asdict(stats))
    return path


def load_activations(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / ACTS_FILE))
    stats = json.loads((path / "stats.json").read_text())
    return tensors["acts"], tensors["index"], tensors["rows"], stats


# --------------------------------------------------------------------------------------------- training


def _batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled float32 batches (one permutation per epoch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[perm[start : start + batch]].float()


def train_topk_sae(
    train_acts: torch.Tensor,
    d_sae: int,
    k: int,
    lr: float,
    batch_tokens: int,
    seed: int,
    hook_layer: int,
    model_name: str,
    autocast: bool | None = None,
):
    """Train a sae-lens ``TopKTrainingSAE`` for one epoch over ``train_acts`` [N, d_in]; return the training SAE
    (call ``save_inference_model`` on it)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    d_in = train_acts.shape[1]
    steps = train_acts.shape[0] // batch_tokens
    if steps < 10:
        raise ValueError(f"only {steps} training steps: need at least 10 x train_batch_tokens activations")
    cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        dtype="float32",
        device="cpu",
        normalize_activations="expected_average_only_in",
        aux_loss_coefficient=1.0,
    )
    sae = TopKTrainingSAE(cfg)
    sae.cfg.metadata.hook_name = f"blocks.{hook_layer}.hook_resid_post"
    sae.cfg.metadata.model_name = model_name
    if autocast is None:
        from esr.models import cpu_supports_bf16

        autocast = cpu_supports_bf16()
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_tokens,
        train_batch_size_samples=batch_tokens,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=max(1, steps // 5),
        device="cpu",
        autocast=autocast,
        dead_feature_window=max(1, steps // 10),
        feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=min(50, steps),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(train_acts, batch_tokens, seed))
    return trainer.fit()


@dataclass
class SAEEvaluation:
    n_heldout_tokens: int
    explained_variance: float
    reconstruction_cosine: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    d_sae: int
    d_in: int


@torch.no_grad()
def evaluate_sae(sae, heldout: torch.Tensor, chunk: int = 8192) -> SAEEvaluation:
    """Explained variance (1 - SSE/SST), mean reconstruction cosine, L0, dead fraction (no firing on the held-out
    set) and dense fraction (firing on > 10% of tokens), on activations never trained on."""
    sse = 0.0
    cos_sum = 0.0
    l0_sum = 0.0
    fires = torch.zeros(sae.cfg.d_sae)
    mean = heldout.float().mean(0)
    sst = float(((heldout.float() - mean) ** 2).sum())
    for start in range(0, heldout.shape[0], chunk):
        x = heldout[start : start + chunk].float()
        f = sae.encode(x)
        xh = sae.decode(f)
        sse += float(((x - xh) ** 2).sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(x, xh, dim=-1).sum())
        active = f > 0
        l0_sum += float(active.sum())
        fires += active.sum(0).float()
    n = heldout.shape[0]
    return SAEEvaluation(
        n_heldout_tokens=n,
        explained_variance=1 - sse / sst,
        reconstruction_cosine=cos_sum / n,
        l0=l0_sum / n,
        dead_fraction=float((fires == 0).float().mean()),
        dense_fraction=float((fires / n > 0.1).float().mean()),
        d_sae=sae.cfg.d_sae,
        d_in=sae.cfg.d_in,
    )


# --------------------------------------------------------------------------------------------- labels


@dataclass
class LatentLabel:
    latent: int
    label: str
    frequency: float
    max_activation: float
    top_tokens: list[str]
    contexts: list[str]
    whole_word_share: float = 0.0


@torch.no_grad()
def top_activations(
    sae, acts: torch.Tensor, top_k: int, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per latent: the ``top_k`` largest activations over ``acts`` and their row indices, plus firing counts.
    Returns (values [top_k, d_sae], indices [top_k, d_sae], fire_counts [d_sae])."""
    d_sae = sae.cfg.d_sae
    best_v = torch.full((top_k, d_sae), -1.0)
    best_i = torch.zeros((top_k, d_sae), dtype=torch.long)
    fires = torch.zeros(d_sae)
    starts = range(0, acts.shape[0], chunk)
    for start in progress(starts, desc="labelling latents", unit="chunks", min_interval_s=10.0):
        f = sae.encode(acts[start : start + chunk].float())
        fires += (f > 0).sum(0).float()
        kk = min(top_k, f.shape[0])
        v, i = torch.topk(f, kk, dim=0)
        cat_v = torch.cat([best_v, v])
        cat_i = torch.cat([best_i, i + start])
        sel_v, sel = torch.topk(cat_v, top_k, dim=0)
        best_v = sel_v
        best_i = torch.gather(cat_i, 0, sel)
    return best_v, best_i, fires


def label_latents(
    sae,
    acts: torch.Tensor,
    index: torch.Tensor,
    rows: torch.Tensor,
    tokenizer,
    top_k: int = 32,
    n_label_tokens: int = 6,
    n_contexts: int = 8,
    min_whole_word_share: float = 0.5,
) -> list[LatentLabel]:
    """Automatic labels from each latent's top activations over ``acts``.

    A top activation counts as a *whole word* when its token starts a word (leading space) and the next token does
    not continue it. The label is the ``n_label_tokens`` most common whole words; a latent whose top activations are
    mostly word pieces, digits or punctuation (whole-word share below ``min_whole_word_share``) gets an empty label
    (counted as unlabeled downstream: we cannot name it in words). ``top_tokens`` keeps every top token either way,
    with contexts (8 tokens before, the token in [[...]], 2 after). Dead latents get an empty label."""
    values, idx, fires = top_activations(sae, acts, top_k)
    n_tok = acts.shape[0]
    vocab_cache: dict[int, str] = {}

    def tok_str(tid: int) -> str:
        if tid not in vocab_cache:
            vocab_cache[tid] = tokenizer.decode([tid])
        return vocab_cache[tid]

    def whole_word(row: int, pos: int) -> bool:
        t = tok_str(int(rows[row, pos]))
        if not (t.startswith(" ") and t.strip().isalpha()):
            return False
        nxt = tok_str(int(rows[row, pos + 1])) if pos + 1 < rows.shape[1] else " "
        return not (nxt[:1].isalpha())

    labels = []
    for j in range(sae.cfg.d_sae):
        live = values[:, j] > 0
        if fires[j] == 0 or not bool(live.any()):
            labels.append(LatentLabel(j, "", 0.0, 0.0, [], []))
            continue
        toks, words, ctxs = [], [], []
        for r in idx[live, j].tolist():
            row, pos = index[r].tolist()
            toks.append(tok_str(int(rows[row, pos])))
            if whole_word(row, pos):
                words.append(toks[-1].strip())
            if len(ctxs) < n_contexts:
                before = "".join(tok_str(int(t)) for t in rows[row, max(0, pos - 8) : pos])
                after = "".join(tok_str(int(t)) for t in rows[row, pos + 1 : pos + 3])
                ctxs.append(f"{before}[[{toks[-1]}]]{after}")
        common_tokens = [t for t, _ in Counter(t.strip() for t in toks if t.strip()).most_common(n_label_tokens)]
        share = len(words) / len(toks)
        label = (
            ", ".join(w for w, _ in Counter(words).most_common(n_label_tokens)) if share >= min_whole_word_share else ""
        )
        labels.append(
            LatentLabel(j, label, float(fires[j] / n_tok), float(values[0, j]), common_tokens, ctxs, round(share, 3))
        )
    return labels


def write_labels_csv(path: str | Path, labels: list[LatentLabel]) -> Path:
    import pandas as pd

    df = pd.DataFrame(
        [{**asdict(l), "top_tokens": json.dumps(l.top_tokens), "contexts": json.dumps(l.contexts)} for l in labels]
    )
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def sae_report_markdown(model: str, ev: SAEEvaluation, act_stats: dict, train_info: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"# Embedded SAE report: {model}",
            "",
            f"TopK SAE (sae-lens), d_in {ev.d_in}, d_sae {ev.d_sae}, k {train_info['k']}, trained on "
            f"{train_info['train_tokens']:,} activations of decoder block {act_stats['layer']} "
            f"(one epoch, {train_info['train_seconds']:.0f} s).",
            "",
            f"Held-out evaluation ({ev.n_heldout_tokens:,} activations never trained on):",
            "",
            "| metric | value |",
            "|---|---|",
            f"| explained variance | {ev.explained_variance:.3f} |",
            f"| reconstruction cosine | {ev.reconstruction_cosine:.3f} |",
            f"| L0 (mean active latents per token) | {ev.l0:.1f} |",
            f"| dead fraction (never fires on held-out) | {ev.dead_fraction:.2%} |",
            f"| dense fraction (fires on > 10% of tokens) | {ev.dense_fraction:.2%} |",
            f"| median residual norm (layer {act_stats['layer']}) | {act_stats['median_resid_norm']:.1f} |",
            f"| attention-sink outliers dropped | {act_stats['n_outliers_dropped']:,} |",
            "",
        ]
    )

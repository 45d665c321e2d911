"""GPU validation of the package's generation paths, in one script.

Run on a node with one CUDA device (written for one H200; ~4-6 minutes for both shapes with the defaults)::

    make gpu-validate        # = python tests/gpu/validate.py --out results/gpu_validate.json
    python tests/gpu/validate.py --shapes llama-8b --batches 1,8 --new-tokens 64 --skip-deepspeed

and on CPU with tiny shapes (what CI runs, through ``tests/test_gpu_validate.py``; ~20 s)::

    DS_ACCELERATOR=cpu python tests/gpu/validate.py --tiny --device cpu --threads 1

Nothing is downloaded. Each *shape* is a random-weight model built from a transformers config with the real sizes
of Gemma-2-2B-it (``gemma2-2b``: hidden 2304, 26 layers, 8 heads / 4 kv heads of 256, MLP 9216, vocab 256000,
sliding window 4096, soft-caps 50/30, eager attention) or Llama-3.1-8B-Instruct (``llama-8b``: hidden 4096, 32
layers, 32 heads / 8 kv heads, MLP 14336, vocab 128256, rope theta 500000 with llama3 rope scaling), in bf16, plus
a random sae-lens SAE of the real width (16384-latent JumpReLU at layer 16 for Gemma; 65536-latent ReLU at layer
19, steering at layer 12, for Llama). The tokenizer is the word-level stand-in of ``esr.testing`` (token ids are
what matter; generated ids outside its vocabulary decode to nothing). ``--tiny`` swaps in the 2-layer, hidden-64,
vocab-512 models of ``esr.testing`` with a 256-latent SAE, batches 1,4 and 16 new tokens.

Steering uses ``--boost`` (default 4) in ``median_resid_norm`` units (the added vector is 4x as long as the median
residual norm at the injection layer, measured on the prompts), a different random latent per row. A random-weight
model's next-token distribution is nearly flat, so a steered row and its unsteered twin (same seed, hence the same
per-row random draws) pick the same token at many positions unless the steering moves the logits well beyond that
flatness: the strong default makes the deepspeed hook check's token comparison decisive. Every generation samples at
temperature 0.6 with the shape's repetition penalty unless said otherwise.

Sections (each one runs per shape; a failure is recorded in the JSON and the other sections still run):

``environment``
    device name, torch / transformers / deepspeed / sae-lens versions, and ``copy_bandwidth_gb_s``: bytes read plus
    bytes written per second by a large device-to-device tensor copy (1 GiB on GPU), the practical HBM bandwidth.
``throughput``
    tokens/s (new tokens of all rows / wall time of the whole call, prefill included) of the package's
    ``SteeredGenerator`` unsteered (no hooks) and steered (a different latent per row), at each ``--batches`` size,
    ``--new-tokens`` new tokens per row with EOS ignored (as ``tests/benchmarks/bench_generation.py``: this is the
    full-batch decode speed), best of ``--repeats``; the same for transformers ``model.generate()`` (sampling, same
    temperature and repetition penalty, no top-k/top-p, ``min_new_tokens`` = ``max_new_tokens``).
    ``hook_overhead`` = steered time / unsteered time - 1. ``roofline_tok_s`` = batch x bandwidth / bytes of weights
    read per decode step (every parameter except an untied input embedding, which is only gathered): the HBM-bound
    ceiling, ignoring the KV cache; ``*_roofline_fraction`` = measured tokens/s / that ceiling.
``deepspeed``
    the model wrapped with ``deepspeed.init_inference`` (tp 1, no kernel injection, ``esr.models.wrap_model(...,
    engine="deepspeed")``). Rows come in pairs (same prompt and seed, unsteered then steered). Checks: the hooks fire
    under DeepSpeed (each steered row's first-token logits move away from its unsteered twin's by more than the
    tolerance, and the generated tokens of at least one pair differ; per-pair token differences are reported), and
    the first-token logits (prefill forward with the hooks installed) equal the transformers engine's within the bf16
    tolerance ``max_abs_diff <= 0.016 * max(1, max |logit|)`` (``max_abs_diff`` is reported). Token agreement with
    the transformers engine is reported, not checked, and so is ``tok_s`` (one cold call of the DeepSpeed engine).
``batch_invariance``
    "a row's tokens do not depend on its batch": ``--invariance-rows`` steered trials generated alone (batch 1) and
    inside a batch of ``--invariance-batch`` rows with other prompts of other lengths (so other padding), greedy
    (temperature 0) and sampled, in the model dtype. Reports the fraction of rows whose tokens match and, per
    mismatching row, the position of the first differing token. Reported, not checked: bf16 GEMMs of different
    batch sizes may round differently on GPU.
``memory``
    ``torch.cuda.max_memory_allocated`` of a steered generation per batch size (null on CPU), a least-squares line
    peak = fixed + per_row x batch (per_row: the measured KV cache + logits cost of one row at this length, next to
    the theoretical KV bytes), and ``max_batch_20pct_headroom`` = the largest batch whose extrapolated peak stays
    under 80 % of the device memory. Printed as a Markdown table.

At the end ONE JSON object is printed (and written to ``--out``, which is also rewritten after each shape so a
killed run leaves its partial results): ``environment``, ``throughput``, ``deepspeed``, ``batch_invariance``,
``memory`` (each ``{shape: {"status": "ok" | "skipped" | "error", ...}}``), ``models`` (what was built),
``settings``, ``checks``, ``failed_checks``, ``errored_sections``, ``out_of_time_sections`` (sections that would have
started after ``--max-minutes``, default 7.5), ``ok`` and ``elapsed_s``. Exit code: 0 when every check passed and
no section errored or ran out of time; 1 when a check failed (hooks, logit tolerance); 2 when no check failed but a
section raised or was cut by the time budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS = ("throughput", "deepspeed", "batch_invariance", "memory")
LOGIT_RTOL = 0.016  # ~2 bf16 ulps of the largest logit
HEADROOM = 0.2


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # llama | gemma2
    injection_layer: int
    sae_layer: int
    d_sae: int
    sae_kind: str  # jumprelu (GemmaScope) | standard (Goodfire ReLU)
    repetition_penalty: float


# layers, SAE and repetition penalty as in config/paper.yaml
SHAPES = {
    "gemma2-2b": Shape("gemma2-2b", "gemma2", 16, 16, 16384, "jumprelu", 1.1),
    "llama-8b": Shape("llama-8b", "llama", 12, 19, 65536, "standard", 1.15),
}
TINY = {"hidden": 64, "n_layers": 2, "vocab": 512, "d_sae": 256, "injection_layer": 0, "sae_layer": 1}


class Skip(Exception):
    """A section that cannot run here: reported as ``{"status": "skipped", "reason": reason, **fields}``."""

    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.fields = fields


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU in seconds); default batches 1,4, 16 tokens")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {','.join(SHAPES)}")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8,32,64; tiny 1,4)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128; tiny 16)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement, best kept")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--boost", type=float, default=4.0, help="steering boost, in median residual norms")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--invariance-batch", type=int, default=32)
    p.add_argument("--invariance-rows", type=int, default=4, help="rows also generated alone (batch 1)")
    p.add_argument("--ds-pairs", type=int, default=4, help="(unsteered, steered) row pairs of the deepspeed check")
    p.add_argument("--skip-deepspeed", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=7.5,
        help="sections that would start after this many minutes are skipped (0: no limit)",
    )
    p.add_argument("--out", default=None, help="also write the JSON summary here (rewritten after each shape)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,8,32,64")).split(",") if b]
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    if min(args.batches) < 1 or args.new_tokens < 1 or args.invariance_batch < 1 or args.repeats < 1:
        p.error("batch sizes, --new-tokens, --invariance-batch and --repeats must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models, SAEs, requests
# ----------------------------------------------------------------------------------------------------------------


def real_config(shape: Shape, tok):
    """The transformers config of the real model (random weights), with the stand-in tokenizer's special ids."""
    from transformers import Gemma2Config, LlamaConfig

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if shape.family == "gemma2":
        return Gemma2Config(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            attn_implementation="eager",
            **ids,
        )
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        **ids,
    )


def build_model(shape: Shape, tiny: bool, device, dtype, seed: int):
    """(random-weight HF model, stand-in tokenizer). Real shapes are initialised directly on ``device`` in ``dtype``
    (an 8B model in fp32 on the host would take 32 GB and minutes)."""
    import torch

    from esr.testing import tiny_gemma2, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    if tiny:
        build = tiny_llama if shape.family == "llama" else tiny_gemma2
        return build(vocab_size=TINY["vocab"], n_layers=TINY["n_layers"], hidden=TINY["hidden"], seed=seed), tok
    from transformers import AutoModelForCausalLM

    cfg = real_config(shape, tok)
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "eager"} if shape.family == "gemma2" else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs)
    return model.eval(), tok


def layers_of(shape: Shape, tiny: bool):
    from esr.steering import SteeringPlan

    if tiny:
        return SteeringPlan(TINY["injection_layer"], TINY["sae_layer"])
    return SteeringPlan(shape.injection_layer, shape.sae_layer)


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` different prompts of different lengths (3 to 22 words) from the stand-in tokenizer's vocabulary."""
    import random

    from esr.testing import TINY_PROMPTS, TINY_WORDS

    rng = random.Random(seed)
    words = [w for w in TINY_WORDS if w.isalpha()]
    out = list(TINY_PROMPTS[:n])
    while len(out) < n:
        out.append(" ".join(rng.choice(words) for _ in range(3 + (7 * len(out)) % 20)))
    return out


def encode_batch(loaded, requests, chat_template: str = "model"):
    """Left-padded ids, mask and position ids of the requests' prompts, as ``SteeredGenerator`` builds them."""
    from esr.generation import encode_prompt, left_pad

    prompts = [encode_prompt(loaded.tokenizer, r.prompt, chat_template) for r in requests]
    ids, mask = left_pad(prompts, loaded.tokenizer.pad_token_id, loaded.device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def median_resid_norm(loaded, layer: int, prompts: list[str]) -> float:
    """Median L2 norm of the output of decoder block ``layer`` over the prompts' (non-pad) tokens."""
    import torch

    from esr.generation import TrialRequest

    ids, mask, pos = encode_batch(loaded, [TrialRequest(p, 0) for p in prompts])
    with torch.inference_mode():
        out = loaded.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, logits_to_keep=1
        )
    h = out.hidden_states[layer + 1].float()
    return float(h.norm(dim=-1)[mask.bool()].median())


def first_token_logits(loaded, directions, plan, requests):
    """Float32 logits [B, V] of the prefill forward (the one that samples the first token) with the requests'
    interventions installed by ``esr.steering.apply_interventions``, as ``SteeredGenerator`` runs it."""
    import torch

    from esr.steering import apply_interventions

    ids, mask, pos = encode_batch(loaded, requests)
    with (
        torch.inference_mode(),
        apply_interventions(loaded.model, [r.intervention for r in requests], directions, plan),
    ):
        out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
    return out.logits[:, -1, :].float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn(*args)``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def copy_bandwidth(device, copies: int = 10) -> dict[str, Any]:
    """Read + write bytes per second of a large device tensor copy: ``copies`` back-to-back copies per timing (so the
    synchronisation overhead is amortised), best of 5 timings after a warm-up."""
    import torch

    n_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)

    def run() -> None:
        for _ in range(copies):
            dst.copy_(src)

    best = min(timed(device, run)[0] for _ in range(5))
    return {
        "copy_bandwidth_gb_s": 2 * n_bytes * copies / best / 1e9,
        "copy_bytes": n_bytes,
        "copy_seconds_per_copy": best / copies,
    }


def weight_bytes_per_step(model) -> int:
    """Bytes of parameters a decode step reads: every parameter once (tied ones once), except an untied input
    embedding (a decode step gathers only B of its rows). ``parameters()`` lists a tied parameter once."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (out is None or emb.weight is not out.weight):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def kv_bytes_per_row(config, seq_len: int, dtype_bytes: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * seq_len * dtype_bytes


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    shape: Shape
    loaded: Any  # esr.models.LoadedModel (transformers engine)
    directions: Any  # esr.sae.SteeringDirections
    plan: Any  # esr.steering.SteeringPlan
    bandwidth: float | None
    peaks: dict[int, int]  # batch size -> peak bytes of a steered package generation (CUDA only)

    @property
    def device(self):
        return self.loaded.device

    def generator(
        self,
        batch_size: int,
        temperature: float | None = None,
        new_tokens: int | None = None,
        ignore_eos: bool = True,
        loaded=None,
    ):
        from esr.generation import GenerationSettings, SteeredGenerator

        settings = GenerationSettings(
            temperature=self.args.temperature if temperature is None else temperature,
            repetition_penalty=self.shape.repetition_penalty,
            max_new_tokens=new_tokens or self.args.new_tokens,
            batch_size=batch_size,
            ignore_eos=ignore_eos,
        )
        return SteeredGenerator(loaded or self.loaded, self.directions, self.plan, settings, progress=False)

    def requests(self, n: int, seed0: int = 0):
        from esr.generation import TrialRequest

        return [TrialRequest(p, seed0 + i, None, f"r{i}") for i, p in enumerate(make_prompts(n, seed0))]

    def steered(self, requests, seed: int):
        """The requests, each steered (``--boost``) along a different random latent."""
        import torch

        from esr.generation import TrialRequest
        from esr.steering import Intervention

        g = torch.Generator().manual_seed(seed)
        latents = torch.randperm(self.directions.d_sae, generator=g)[: len(requests)].tolist()
        return [
            TrialRequest(r.prompt, r.seed, Intervention(steer_latent=j, boost=self.args.boost), r.trial_id)
            for r, j in zip(requests, latents)
        ]


def hf_generate(ctx: Ctx, requests, new_tokens: int | None = None) -> int:
    """transformers ``model.generate`` on the same prompts and sampling settings; returns the new-token count."""
    import torch
    from transformers import GenerationConfig

    ids, mask, _ = encode_batch(ctx.loaded, requests)
    n = new_tokens or ctx.args.new_tokens
    cfg = GenerationConfig(
        do_sample=ctx.args.temperature > 0,
        temperature=ctx.args.temperature or None,
        top_k=0,
        top_p=1.0,
        repetition_penalty=ctx.shape.repetition_penalty,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=ctx.loaded.tokenizer.pad_token_id,
        eos_token_id=ctx.loaded.eos_token_ids(),
    )
    torch.manual_seed(0)
    with torch.inference_mode():
        out = ctx.loaded.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    new = out.shape[1] - ids.shape[1]
    if new != n:
        raise RuntimeError(f"model.generate produced {new} new tokens per row instead of {n}")
    return new * len(requests)


def section_throughput(ctx: Ctx) -> dict[str, Any]:
    import torch

    dev = ctx.device
    wbytes = weight_bytes_per_step(ctx.loaded.model)
    rows = []
    for bs in ctx.args.batches:
        plain = ctx.requests(bs)
        steer = ctx.steered(plain, seed=bs)
        gen = ctx.generator(bs)
        warm = ctx.generator(bs, new_tokens=min(4, ctx.args.new_tokens))  # warm-up (kernels, allocator)
        warm.generate(plain)
        warm.generate(steer)
        best = {"esr_unsteered": math.inf, "esr_steered": math.inf, "hf_generate": math.inf}
        n_tok: dict[str, int] = {}
        for rep in range(ctx.args.repeats):
            dt, res = timed(dev, gen.generate, plain)
            best["esr_unsteered"], n_tok["esr_unsteered"] = min(best["esr_unsteered"], dt), sum(r.n_tokens for r in res)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            dt, res = timed(dev, gen.generate, steer)
            if dev.type == "cuda":
                ctx.peaks[bs] = max(ctx.peaks.get(bs, 0), torch.cuda.max_memory_allocated(dev))
            best["esr_steered"], n_tok["esr_steered"] = min(best["esr_steered"], dt), sum(r.n_tokens for r in res)
            if rep == 0:
                hf_generate(ctx, plain, new_tokens=min(4, ctx.args.new_tokens))  # warm-up
            dt, n = timed(dev, hf_generate, ctx, plain)
            best["hf_generate"], n_tok["hf_generate"] = min(best["hf_generate"], dt), n
        row: dict[str, Any] = {"batch": bs}
        for k in best:
            row[f"{k}_tok_s"] = n_tok[k] / best[k]
            row[f"{k}_s"] = best[k]
        row["hook_overhead"] = best["esr_steered"] / best["esr_unsteered"] - 1
        row["esr_vs_hf_generate"] = row["esr_unsteered_tok_s"] / row["hf_generate_tok_s"]
        if ctx.bandwidth:
            roof = bs * ctx.bandwidth * 1e9 / wbytes
            row["roofline_tok_s"] = roof
            for k in best:
                row[f"{k}_roofline_fraction"] = row[f"{k}_tok_s"] / roof
        rows.append(row)
        print(
            f"  [{ctx.shape.name}] throughput batch {bs}: esr {row['esr_unsteered_tok_s']:.1f} / steered "
            f"{row['esr_steered_tok_s']:.1f} / hf {row['hf_generate_tok_s']:.1f} tok/s",
            flush=True,
        )
    return {
        "new_tokens": ctx.args.new_tokens,
        "temperature": ctx.args.temperature,
        "repetition_penalty": ctx.shape.repetition_penalty,
        "repeats": ctx.args.repeats,
        "weight_bytes_per_step": wbytes,
        "copy_bandwidth_gb_s": ctx.bandwidth,
        "rows": rows,
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def section_batch_invariance(ctx: Ctx) -> dict[str, Any]:
    n = ctx.args.invariance_batch
    batch = ctx.steered(ctx.requests(n, seed0=100), seed=1)
    k = min(ctx.args.invariance_rows, n)
    check = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    out: dict[str, Any] = {
        "batch_size": n,
        "rows_checked": check,
        "new_tokens": ctx.args.new_tokens,
        "dtype": str(ctx.loaded.dtype).replace("torch.", ""),
    }
    for mode, temp in (("greedy", 0.0), ("sampled", ctx.args.temperature)):
        together = ctx.generator(n, temperature=temp, ignore_eos=False).generate(batch)
        alone_gen = ctx.generator(1, temperature=temp, ignore_eos=False)
        diffs: dict[str, int] = {}
        for i in check:
            alone = alone_gen.generate([batch[i]])[0]
            pos = first_difference(alone.token_ids, together[i].token_ids)
            if pos is not None:
                diffs[str(i)] = pos
        out[mode] = {
            "temperature": temp,
            "matching_fraction": 1 - len(diffs) / len(check),
            "n_match": len(check) - len(diffs),
            "n_rows": len(check),
            "first_difference": diffs,
        }
        print(
            f"  [{ctx.shape.name}] batch invariance {mode}: {len(check) - len(diffs)}/{len(check)} rows match",
            flush=True,
        )
    return out


def fit_memory(peaks: dict[int, int], static: int, total: int, headroom: float = HEADROOM) -> dict[str, Any]:
    """Least-squares line peak = fixed + per_row x batch through the measured peaks (one batch size: the line through
    ``static``, the bytes held between generations), and the largest batch whose extrapolated peak stays within
    ``(1 - headroom) * total``."""
    xs = sorted(peaks)
    ys = [peaks[b] for b in xs]
    if len(xs) >= 2:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        per_row = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - per_row * mx
    else:
        per_row, fixed = (ys[0] - static) / xs[0], float(static)
    max_batch = int(((1 - headroom) * total - fixed) // per_row) if per_row > 0 else None
    return {
        "peak_bytes_by_batch": {str(b): peaks[b] for b in xs},
        "static_bytes": static,
        "fit_fixed_bytes": fixed,
        "fit_per_row_bytes": per_row,
        "device_total_bytes": total,
        "headroom": headroom,
        "max_batch_20pct_headroom": max_batch,
    }


def section_memory(ctx: Ctx) -> dict[str, Any]:
    import torch

    from esr.generation import encode_prompt

    dev = ctx.device
    if dev.type != "cuda":
        raise Skip(
            f"device {dev} has no torch.cuda memory statistics: peak memory and max batch are null",
            peak_bytes_by_batch=None,
            fit_per_row_bytes=None,
            max_batch_20pct_headroom=None,
        )
    steer_all = ctx.steered(ctx.requests(max(ctx.args.batches)), seed=2)
    for bs in ctx.args.batches:
        if bs not in ctx.peaks:  # the throughput section measures them; redo what it did not
            torch.cuda.reset_peak_memory_stats(dev)
            ctx.generator(bs).generate(steer_all[:bs])
            ctx.peaks[bs] = torch.cuda.max_memory_allocated(dev)
    # weights + SAE (+ allocator leftovers), between generations
    out = fit_memory(ctx.peaks, torch.cuda.memory_allocated(dev), torch.cuda.get_device_properties(dev).total_memory)
    seq = ctx.args.new_tokens + max(len(encode_prompt(ctx.loaded.tokenizer, r.prompt)) for r in steer_all)
    kv = kv_bytes_per_row(ctx.loaded.model.config, seq, ctx.loaded.model.dtype.itemsize)
    return {**out, "seq_len": seq, "kv_bytes_per_row_theoretical": kv}


def section_deepspeed(ctx: Ctx) -> dict[str, Any]:
    """Runs last for a shape: DeepSpeed wraps (and may move) the very module the transformers engine uses."""
    if ctx.args.skip_deepspeed:
        raise Skip("--skip-deepspeed")
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken accelerator set-up at import
        if ctx.device.type == "cuda":  # a GPU node must be able to run the paper's engine
            raise
        raise Skip(f"deepspeed cannot be imported here: {type(e).__name__}: {e}") from e
    from esr.models import wrap_model

    plain = ctx.requests(ctx.args.ds_pairs, seed0=200)
    steer = ctx.steered(plain, seed=3)
    pairs = [r for pair in zip(plain, steer) for r in pair]  # unsteered, steered, unsteered, steered, ...
    ref_logits = first_token_logits(ctx.loaded, ctx.directions, ctx.plan, pairs)
    ref_tokens = [r.token_ids for r in ctx.generator(len(pairs)).generate(pairs)]
    lm = ctx.loaded
    ds_loaded = wrap_model(lm.model, lm.tokenizer, dtype=lm.dtype, engine="deepspeed", tp_size=1)
    if ds_loaded.device != lm.device:
        raise RuntimeError(f"deepspeed put the model on {ds_loaded.device}, not {lm.device}: set DS_ACCELERATOR")
    ds_logits = first_token_logits(ds_loaded, ctx.directions, ctx.plan, pairs)
    gen = ctx.generator(len(pairs), loaded=ds_loaded)
    dt, res = timed(ctx.device, gen.generate, pairs)
    ds_tokens = [r.token_ids for r in res]
    diff = float((ds_logits - ref_logits).abs().max())
    tol = LOGIT_RTOL * max(1.0, float(ref_logits.abs().max()))
    steer_shift = [float((ds_logits[2 * i + 1] - ds_logits[2 * i]).abs().max()) for i in range(len(plain))]
    tokens_differ = [ds_tokens[2 * i + 1] != ds_tokens[2 * i] for i in range(len(plain))]
    # every steered row's first-token logits move; the tokens of at least one pair differ over the decode loop
    hooks_fire = min(steer_shift) > tol and any(tokens_differ)
    matches = [a == b for a, b in zip(ds_tokens, ref_tokens)]
    print(
        f"  [{ctx.shape.name}] deepspeed: logits max |diff| {diff:.3g} (tol {tol:.3g}), hooks fire {hooks_fire}",
        flush=True,
    )
    return {
        "deepspeed_version": deepspeed.__version__,
        "engine": ds_loaded.engine,
        "accelerator": os.environ.get("DS_ACCELERATOR"),
        "rows": len(pairs),
        "first_token_logits_max_abs_diff": diff,
        "logit_tolerance": tol,
        "logits_within_tolerance": diff <= tol,
        "steered_logit_shift_min": min(steer_shift),
        "steered_tokens_differ": tokens_differ,
        "hooks_fire": hooks_fire,
        "token_match_fraction_vs_transformers": sum(matches) / len(matches),
        "tok_s": sum(r.n_tokens for r in res) / dt,
        "new_tokens": ctx.args.new_tokens,
        "dtype": str(lm.dtype).replace("torch.", ""),
    }


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run_section(
    results: dict[str, Any], section: str, shape: str, fn: Callable[..., dict[str, Any]], *args: Any
) -> None:
    """``results[section][shape]`` = ``fn(*args)`` with status ok, or the skip reason, or the error."""
    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **fn(*args)}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e), **e.fields}
    except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
        out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        print(f"  [{shape}] {section} FAILED: {out['error']}", file=sys.stderr, flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    results[section][shape] = out


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed", "sae-lens", "esr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def environment(device) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "device": str(device),
        **versions(),
        "torch_cuda": torch.version.cuda,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_total_bytes=props.total_memory)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    env.update(copy_bandwidth(device))
    return env


def checks_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for shape, ds in results["deepspeed"].items():
        if ds.get("status") == "ok":
            checks.append({"name": f"deepspeed.hooks_fire[{shape}]", "passed": bool(ds["hooks_fire"])})
            checks.append(
                {"name": f"deepspeed.first_token_logits[{shape}]", "passed": bool(ds["logits_within_tolerance"])}
            )
    return checks


def markdown_tables(results: dict[str, Any]) -> str:
    lines = [
        "| shape | batch | esr tok/s | esr steered tok/s | hf generate tok/s | hook overhead | roofline tok/s "
        "| esr / roofline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, t in results["throughput"].items():
        for r in t.get("rows", []):
            roof = r.get("roofline_tok_s")
            frac = r.get("esr_unsteered_roofline_fraction")
            lines.append(
                f"| {shape} | {r['batch']} | {r['esr_unsteered_tok_s']:.1f} | {r['esr_steered_tok_s']:.1f} "
                f"| {r['hf_generate_tok_s']:.1f} | {100 * r['hook_overhead']:+.1f}% | "
                f"{'-' if roof is None else f'{roof:.0f}'} | {'-' if frac is None else f'{frac:.1%}'} |"
            )
    lines += [
        "",
        "| shape | batch | peak GiB | per-row MiB (fit) | KV MiB/row (theory) | max batch (20% headroom) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape, m in results["memory"].items():
        if m.get("status") != "ok":
            lines.append(f"| {shape} | - | null | null | null | null |")
            continue
        for b, peak in m["peak_bytes_by_batch"].items():
            lines.append(
                f"| {shape} | {b} | {peak / 2**30:.2f} | {m['fit_per_row_bytes'] / 2**20:.1f} | "
                f"{m['kv_bytes_per_row_theoretical'] / 2**20:.1f} | {m['max_batch_20pct_headroom']} |"
            )
    return "\n".join(lines)


def build_ctx(args: argparse.Namespace, shape: Shape, device, dtype, bandwidth: float | None) -> Ctx:
    """Model (transformers engine), SAE of the shape's width and its steering directions."""
    from esr.models import wrap_model
    from esr.sae import SteeringDirections
    from esr.testing import tiny_sae

    model, tok = build_model(shape, args.tiny, device, dtype, args.seed)
    loaded = wrap_model(model, tok, dtype=dtype, device=device)
    plan = layers_of(shape, args.tiny)
    sae = tiny_sae(
        d_in=loaded.d_model,
        d_sae=TINY["d_sae"] if args.tiny else shape.d_sae,
        kind=shape.sae_kind,
        seed=args.seed,
        layer=plan.sae_layer,
    ).to(device)
    norm = median_resid_norm(loaded, plan.injection_layer, make_prompts(8, 0))
    directions = SteeringDirections(sae, "median_resid_norm", median_resid_norm=norm)
    return Ctx(args, shape, loaded, directions, plan, bandwidth, {})


def describe_model(ctx: Ctx) -> dict[str, Any]:
    cfg = ctx.loaded.model.config
    return {
        "family": ctx.shape.family,
        "n_params": sum(p.numel() for p in ctx.loaded.model.parameters()),
        "hidden": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
        "dtype": str(ctx.loaded.dtype).replace("torch.", ""),
        "attn_implementation": cfg._attn_implementation,
        "injection_layer": ctx.plan.injection_layer,
        "sae_layer": ctx.plan.sae_layer,
        "d_sae": ctx.directions.d_sae,
        "sae_kind": ctx.shape.sae_kind,
        "median_resid_norm": ctx.directions.median_resid_norm,
    }


def summarize(results: dict[str, Any], elapsed: float, complete: bool) -> dict[str, Any]:
    """The JSON summary: sections in a fixed order, then the checks and what failed, errored or ran out of time."""
    out = {k: results[k] for k in ("environment", *SECTIONS, "models", "settings")}
    out["checks"] = checks_of(results)
    out["failed_checks"] = [c["name"] for c in out["checks"] if not c["passed"]]
    out["errored_sections"] = [
        f"{s}[{shape}]" for s in SECTIONS for shape, r in results[s].items() if r.get("status") == "error"
    ]
    if results["environment"].get("status") == "error":
        out["errored_sections"].append("environment")
    out["out_of_time_sections"] = list(results["out_of_time"])
    out["ok"] = complete and not (out["failed_checks"] or out["errored_sections"] or out["out_of_time_sections"])
    out["complete"] = complete
    out["elapsed_s"] = round(elapsed, 1)
    return out


def write_json(summary: dict[str, Any], path: str | None) -> str:
    text = json.dumps(summary, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # DeepSpeed picks its accelerator from DS_ACCELERATOR at first use (the Makefile exports "cpu" for CPU CI)
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    def out_of_time() -> bool:
        return bool(args.max_minutes) and time.perf_counter() - t_start > 60 * args.max_minutes

    results: dict[str, Any] = {"environment": {}, **{s: {} for s in SECTIONS}, "models": {}, "out_of_time": []}
    try:
        results["environment"] = {"status": "ok", **environment(device)}
    except Exception as e:  # noqa: BLE001 - recorded; the shapes still run (without a roofline)
        results["environment"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    bandwidth = results["environment"].get("copy_bandwidth_gb_s")
    results["settings"] = {
        "tiny": args.tiny,
        "shapes": args.shapes,
        "batches": args.batches,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "temperature": args.temperature,
        "dtype": args.dtype,
        "boost_median_resid_norm": args.boost,
        "invariance_batch": args.invariance_batch,
        "invariance_rows": args.invariance_rows,
        "ds_pairs": args.ds_pairs,
        "max_minutes": args.max_minutes,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    budget_note = {"status": "skipped", "reason": f"time budget (--max-minutes {args.max_minutes}) used up"}
    for name in args.shapes:
        if out_of_time():
            for s in SECTIONS:
                results[s][name] = dict(budget_note)
                results["out_of_time"].append(f"{s}[{name}]")
            continue
        print(f"== {name}{' (tiny)' if args.tiny else ''} on {device}", flush=True)
        t0 = time.perf_counter()
        try:
            ctx = build_ctx(args, SHAPES[name], device, dtype, bandwidth)
        except Exception as e:  # noqa: BLE001 - every section of this shape records the error
            err = {
                "status": "error",
                "error": f"building {name}: {type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8),
            }
            print(f"  [{name}] build FAILED: {err['error']}", file=sys.stderr, flush=True)
            results["models"][name] = err
            for s in SECTIONS:
                results[s][name] = dict(err)
        else:
            results["models"][name] = {**describe_model(ctx), "build_s": round(time.perf_counter() - t0, 2)}
            # deepspeed last: it wraps (and may move) the module the transformers engine uses
            for section, fn in (
                ("throughput", section_throughput),
                ("memory", section_memory),
                ("batch_invariance", section_batch_invariance),
                ("deepspeed", section_deepspeed),
            ):
                if out_of_time():
                    results[section][name] = dict(budget_note)
                    results["out_of_time"].append(f"{section}[{name}]")
                else:
                    run_section(results, section, name, fn, ctx)
            del ctx  # free the shape before the next one
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(summarize(results, time.perf_counter() - t_start, complete=False), args.out)  # partial
    summary = summarize(results, time.perf_counter() - t_start, complete=True)
    print("\n" + markdown_tables(summary) + "\n")
    print(write_json(summary, args.out))
    return 1 if summary["failed_checks"] else (0 if summary["ok"] else 2)


if __name__ == "__main__":
    raise SystemExit(main())

"""Batched steered sampling (transformers or DeepSpeed inference), one record per trial.

``SteeredGenerator.generate(requests)`` runs its own decoding loop over the HF model (KV cache, left padding)
instead of ``model.generate`` so that:

- every row samples from its own ``torch.Generator`` seeded with the trial's seed: a row's tokens do not depend on
  the other rows of its batch, and a trial is reproducible from its record (seed + intervention + settings);
- the repetition penalty (vLLM/HF semantics: any token of prompt or output, divided if positive, multiplied if
  negative) ignores pad tokens, so padding does not change a row;
- the SAE activations of *every* generated token are captured, including the last one (one extra forward);
- under DeepSpeed tp>1 every rank samples identically (same seeds, and rank 0's tokens are broadcast).

Speed (none of it changes a token): rows sample with ``multinomial_rows`` (bit-identical to ``torch.multinomial`` per
row, but only the uniform draws are per row); the KV cache is preallocated (``decode_cache``: no concatenation of
the whole history at every step); rows that hit EOS leave the batch, the KV cache and the hooks
(``SteeredGenerator.drop_finished``; a row that captures stays one more forward for its last token's activations).

Interventions (steer / ablate / capture) are applied by ``esr.steering.apply_interventions``.
Chat templates: ``model`` (the tokenizer's own) or ``reference_llama_prompt`` (the authors' engine: after the Llama-3
template, append ``<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>`` token ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from esr.models import LoadedModel
from esr.ranks import broadcast_tensor
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan, apply_interventions

log = logging.getLogger("esr.generation")

CHAT_TEMPLATES = ("model", "reference_llama_prompt", "none")
REFERENCE_LLAMA_SUFFIX = "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>"


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; recorded in every result. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.6
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    chat_template: str = "model"
    batch_size: int = 16
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature {self.temperature} must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty {self.repetition_penalty} must be > 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} must be >= 1")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template {self.chat_template!r} is not one of {CHAT_TEMPLATES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1")


@dataclass(frozen=True)
class TrialRequest:
    """One row to generate: a user prompt, a seed and what to do to the model (None: unsteered)."""

    prompt: str
    seed: int
    intervention: Intervention | None = None
    trial_id: str | None = None


@dataclass
class GenerationResult:
    trial_id: str | None
    prompt: str
    seed: int
    intervention: Intervention | None
    response: str
    token_ids: list[int]
    n_tokens: int
    finish_reason: str  # "eos" | "length"
    prompt_token_ids: list[int]
    activations: torch.Tensor | None = None  # [n_tokens, len(intervention.capture)], float32 on CPU
    steering: dict[str, Any] = field(default_factory=dict)  # boost, boost_unit, coefficient, residual norm
    settings: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """JSON-able record (activations excluded: they go to the activation store)."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if k != "activations"}
        row["intervention"] = dataclasses.asdict(self.intervention) if self.intervention is not None else None
        return row


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str, chat_template: str = "model", system: str | None = None) -> list[int]:
    """Token ids of one user turn plus the generation prompt, in the chosen template."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template {chat_template!r} is not one of {CHAT_TEMPLATES}")
    if chat_template == "none":
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use chat_template 'none' or a tokenizer that has one"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if chat_template == "reference_llama_prompt":
        ids += reference_llama_suffix_ids(tokenizer)
    return ids


def reference_llama_suffix_ids(tokenizer) -> list[int]:
    """Ids of ``<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>`` ([128000, 128006, 78191, 128007]
    for Llama-3), which the authors' engine appended after the chat template."""
    ids = list(tokenizer(REFERENCE_LLAMA_SUFFIX, add_special_tokens=False)["input_ids"])
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>")
    unk = tokenizer.unk_token_id
    if any(tokenizer.convert_tokens_to_ids(s) in (None, unk) for s in specials) or len(ids) != 4:
        raise ValueError(
            f"chat_template 'reference_llama_prompt' needs a Llama-3 tokenizer; "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} encodes {REFERENCE_LLAMA_SUFFIX!r} as {ids}"
        )
    return ids


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and attention mask [B, T]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"prompt {i} of the batch encodes to zero tokens")
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def penalise_history(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty on every token a row has seen: logit / penalty if positive, logit * penalty otherwise.
    ``history`` [B, H] lists each row's seen token ids (repeats allowed: they write the same value). In place on
    ``logits``; touches B*H entries instead of a [B, V] mask."""
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    v = logits.gather(1, history)
    return logits.scatter_(1, history, torch.where(v > 0, v / penalty, v * penalty))


def sample_rows(logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row; row i uses only ``generators[i]`` (so rows are independent of each other).
    Exactly ``torch.multinomial(softmax(logits[i] / temperature), 1, generator=generators[i])`` for every row (same
    tokens, same generator states afterwards), computed batched (see ``multinomial_rows``)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return multinomial_rows(probs, generators)


def multinomial_rows(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``torch.cat([torch.multinomial(probs[i], 1, generator=generators[i]) for i])``, bit for bit, without its
    per-row validation and division.

    For one sample torch draws ``q ~ Exp(1)`` per element (``q = empty_like(p).exponential_(1, g)``) and returns
    ``argmax(p / q)``. On CPU ``exponential_`` is ``-log1p(-u)`` of the double ``u`` that ``uniform_`` on a float64
    tensor draws from the same generator state (one 64-bit draw per element), so the per-row work shrinks to a
    ``uniform_`` (about 4x cheaper than ``exponential_``) and the rest runs batched. Other devices: the per-row
    ``exponential_`` itself (what ``multinomial`` does), then the same batched division."""
    if probs.dim() != 2 or probs.shape[0] != len(generators):
        raise ValueError(f"probs {tuple(probs.shape)} needs one row per generator ({len(generators)})")
    lo, hi = torch.aminmax(probs)
    if not (bool(lo >= 0) and bool(hi < float("inf"))):  # also false for NaN
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    if probs.device.type == "cpu" and all(g.device.type == "cpu" for g in generators):
        u = torch.empty(probs.shape, dtype=torch.float64)
        _uniform_rows(u, generators)
        # q = -log1p(-u) > 0; with l = -q (cast symmetrically), argmax(p / q) == argmin(p / l), NaN and ties alike
        neg_q = u.neg_().log1p_().to(probs.dtype)
        return torch.div(probs, neg_q, out=neg_q).argmin(dim=-1)
    else:
        q = torch.empty_like(probs)
        for i, g in enumerate(generators):
            q[i].exponential_(1.0, generator=g)
    return torch.div(probs, q, out=q).argmax(dim=-1)


_POOL: Any = None  # (ThreadPoolExecutor, its number of workers)


def _uniform_rows(u: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    """``u[i].uniform_(0, 1, generator=generators[i])`` for every row, spread over ``torch.get_num_threads()``
    Python threads (the kernel is serial and releases the GIL; each generator stays on one thread)."""
    global _POOL
    n_workers = min(torch.get_num_threads(), len(generators) // 4)

    def fill(lo: int, hi: int) -> None:
        with torch.inference_mode():  # thread-local; ``u`` may be an inference tensor
            for i in range(lo, hi):
                u[i].uniform_(0.0, 1.0, generator=generators[i])

    if n_workers < 2:
        fill(0, len(generators))
        return
    if _POOL is None or _POOL[1] < n_workers - 1:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = (ThreadPoolExecutor(max_workers=n_workers - 1, thread_name_prefix="esr-sample"), n_workers - 1)
    bounds = [len(generators) * k // n_workers for k in range(n_workers + 1)]
    futures = [_POOL[0].submit(fill, bounds[k], bounds[k + 1]) for k in range(1, n_workers)]
    fill(bounds[0], bounds[1])
    for f in futures:
        f.result()


def row_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def decode_cache(model, capacity: int):
    """A ``DynamicCache`` for ``model`` whose full-attention layers write into buffers preallocated for ``capacity``
    positions (prompt + new tokens) instead of concatenating the whole K/V history at every step (the largest
    non-matmul cost of a batched decode step on CPU). Attention sees exactly the same keys and values (a view of
    the first ``n`` positions). Layers of other kinds (sliding window, ...) are left as transformers builds them.
    ``None`` (the model's default cache) when this transformers version has no such cache API."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - transformers < 4.56
        return None

    class PreallocatedLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._n = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            cap = max(capacity, key_states.shape[-2])
            self._k = key_states.new_empty(key_states.shape[:2] + (cap, key_states.shape[-1]))
            self._v = value_states.new_empty(value_states.shape[:2] + (cap, value_states.shape[-1]))
            self._n = 0
            self.is_initialized = True

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self._n, key_states.shape[-2]
            if n + t > self._k.shape[-2]:  # more positions than planned: grow (never in SteeredGenerator)
                grow = max(2 * self._k.shape[-2], n + t)
                self._k = torch.cat(
                    [self._k[:, :, :n], self._k.new_empty(self._k.shape[:2] + (grow - n, self._k.shape[-1]))], 2
                )
                self._v = torch.cat(
                    [self._v[:, :, :n], self._v.new_empty(self._v.shape[:2] + (grow - n, self._v.shape[-1]))], 2
                )
            self._k[:, :, n : n + t].copy_(key_states)
            self._v[:, :, n : n + t].copy_(value_states)
            self._n = n + t
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def _unsupported(self, *args, **kwargs):
            raise NotImplementedError("PreallocatedLayer only supports appending and batch_select_indices")

        crop = reorder_cache = batch_repeat_interleave = reset = offload = _unsupported

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # pragma: no cover - unusual configs: let the model build its own cache
        return None
    if not cache.layers:  # no per-layer types in the config: layers are created lazily
        cache.layer_class_to_replicate = PreallocatedLayer
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# ----------------------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SteeredGenerator:
    """Generates trials on one loaded model with one SAE's steering directions."""

    loaded: LoadedModel
    directions: SteeringDirections | None
    plan: SteeringPlan
    settings: GenerationSettings = GenerationSettings()
    progress: bool = True
    # rows that hit EOS leave the batch (and the KV cache) instead of decoding pads: same tokens, less work
    drop_finished: bool = True

    def settings_record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.settings)
        out.update(dataclasses.asdict(self.plan))
        out.update(
            {
                "engine": self.loaded.engine,
                "tp_size": self.loaded.tp_size,
                "dtype": str(self.loaded.dtype),
                "boost_unit": self.directions.boost_unit if self.directions else None,
                "median_resid_norm": self.directions.median_resid_norm if self.directions else None,
            }
        )
        return out

    def generate(self, requests: Sequence[TrialRequest], *, desc: str = "generating") -> list[GenerationResult]:
        """All requests, in batches of ``settings.batch_size``; results in request order. With ``progress`` on and
        more than one batch, logs a progress line (``desc``: done/total sequences, rate, ETA; at most one per 10 s)
        to the rule's log (:class:`esr.progress.Progress`)."""
        from esr.progress import Progress

        bs = self.settings.batch_size
        chunks = [list(requests[i : i + bs]) for i in range(0, len(requests), bs)]
        results: list[GenerationResult] = []
        meter = Progress(total=len(requests), desc=desc, unit="sequences", min_interval_s=10.0, logger=log)
        for chunk in chunks:
            results.extend(self.generate_batch(chunk))
            if self.progress and len(chunks) > 1:
                meter.update(len(chunk))
        return results

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[TrialRequest]) -> list[GenerationResult]:
        lm, s = self.loaded, self.settings
        model, tok, device = lm.model, lm.tokenizer, lm.device
        prompts = [encode_prompt(tok, r.prompt, s.chat_template) for r in requests]
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        B = len(requests)
        pad = tok.pad_token_id
        eos = torch.tensor([] if s.ignore_eos else lm.eos_token_ids(), dtype=torch.long, device=device)
        generators = [row_generator(r.seed, device) for r in requests]
        # repetition penalty: the ids seen by each row (prompt, then each generated token). Pad positions must not
        # mark the pad id as seen (it may also occur in the prompt): they repeat the row's first prompt token.
        first = ids.gather(1, (mask == 0).sum(1, keepdim=True))
        history = torch.cat([torch.where(mask.bool(), ids, first), first.expand(B, s.max_new_tokens)], dim=1)
        n_hist = ids.shape[1]
        interventions = [r.intervention for r in requests]
        captures = [iv is not None and bool(iv.capture) for iv in interventions]
        tokens = torch.full((B, s.max_new_tokens), pad, dtype=torch.long, device=device)
        n_tokens = torch.zeros(B, dtype=torch.long, device=device)
        finished_all = torch.zeros(B, dtype=torch.bool, device=device)
        # the current batch: ``rows[k]`` is the request index of batch row k (rows are dropped once finished)
        rows = list(range(B))
        row_idx = torch.arange(B, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        fin = [False] * B  # ``finished`` on the host
        acts: dict[int, list[torch.Tensor]] = {}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = decode_cache(model, ids.shape[1] + s.max_new_tokens)
        stack = contextlib.ExitStack()
        try:
            hooks = stack.enter_context(apply_interventions(model, interventions, self.directions, self.plan))
            skip = 1  # the prompt forward's capture is not a generated token's
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache, pos = out.cache, positions[:, -1:]
            for step in range(s.max_new_tokens):
                b = len(rows)
                logits = penalise_history(out.logits[:, -1, :].float(), history[:, :n_hist], s.repetition_penalty)
                nxt = sample_rows(logits, s.temperature, generators)
                nxt = broadcast_tensor(torch.where(finished, pad, nxt))
                tokens[row_idx, step] = nxt
                n_tokens[row_idx] += (~finished).long()
                history[:, n_hist] = torch.where(finished, history[:, 0], nxt)
                n_hist += 1
                finished = finished | torch.isin(nxt, eos)
                last = step == s.max_new_tokens - 1
                was, fin = fin, finished.tolist()  # the step's only host sync
                done = all(fin) or last
                if not self.drop_finished:
                    if done and not hooks.batch.any_capture:
                        break
                    keep = list(range(b))
                else:
                    # a row needs the next forward to sample its next token, or to capture the activations of the
                    # token it just produced (its last one included: HF never runs the final token through)
                    keep = [k for k in range(b) if (not fin[k] and not last) or (captures[rows[k]] and not was[k])]
                    if not keep:
                        break
                if len(keep) < b:  # drop finished rows: from the batch, the KV cache and the hooks
                    finished_all[row_idx] = finished
                    _collect_captured(hooks, rows, skip, acts)
                    stack.close()
                    sel = torch.tensor(keep, dtype=torch.long, device=device)
                    rows, fin = [rows[k] for k in keep], [fin[k] for k in keep]
                    row_idx, finished, nxt, history = row_idx[sel], finished[sel], nxt[sel], history[sel]
                    mask, pos = mask[sel], pos[sel]
                    generators = [generators[k] for k in keep]
                    cache.batch_select_indices(sel)
                    hooks = stack.enter_context(
                        apply_interventions(model, [interventions[i] for i in rows], self.directions, self.plan)
                    )
                    skip = 0
                # on the last step this forward only serves capture: HF never runs the final token through
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], dim=1)
                pos = pos + 1
                out = model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=pos,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                if done:
                    break
            finished_all[row_idx] = finished
            _collect_captured(hooks, rows, skip, acts)
        finally:
            stack.close()
        return self._results(requests, prompts, tokens, n_tokens, finished_all, acts)

    def _results(self, requests, prompts, tokens, n_tokens, finished, acts):
        tok = self.loaded.tokenizer
        tokens, n_tokens, finished = tokens.cpu(), n_tokens.tolist(), finished.tolist()
        settings = self.settings_record()
        results = []
        for i, req in enumerate(requests):
            n = n_tokens[i]
            ids = tokens[i, :n].tolist()
            iv = req.intervention
            row_acts = None
            if iv is not None and iv.capture:
                row_acts = torch.cat(acts[i], dim=0)[:n].to(device="cpu", dtype=torch.float32).clone()
            steering = (
                self.directions.describe(iv.steer_latent, iv.boost)
                if self.directions is not None and iv is not None and iv.steer_latent is not None
                else {"boost": 0.0, "boost_unit": self.directions.boost_unit if self.directions else None}
            )
            results.append(
                GenerationResult(
                    trial_id=req.trial_id,
                    prompt=req.prompt,
                    seed=req.seed,
                    intervention=iv,
                    response=tok.decode(ids, skip_special_tokens=True),
                    token_ids=ids,
                    n_tokens=n,
                    finish_reason="eos" if finished[i] else "length",
                    prompt_token_ids=list(prompts[i]),
                    activations=row_acts,
                    steering=steering,
                    settings=settings,
                )
            )
        return results


def _collect_captured(hooks, rows: Sequence[int], skip: int, acts: dict[int, list[torch.Tensor]]) -> None:
    """Append to ``acts[request index]`` the captured activations ([forwards, len(capture)], in the row's capture
    order) of every capturing batch row, from ``hooks.captured[skip:]`` (one [b, 1, C] tensor per decode forward)."""
    captured = hooks.captured[skip:]
    if not captured or not hooks.batch.any_capture:
        return
    stacked = torch.cat(captured, dim=1)
    for k, cols in enumerate(hooks.batch.capture_columns):
        if cols:
            acts.setdefault(rows[k], []).append(stacked[k][:, cols])


def generator_for_spec(
    spec,
    loaded: LoadedModel,
    directions: SteeringDirections | None,
    *,
    temperature: float = 0.6,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    positions: str = "all",
    ablation_layer: int | None = None,
    progress: bool = True,
) -> SteeredGenerator:
    """A ``SteeredGenerator`` with the layers, repetition penalty and chat template of a config model entry."""
    plan = SteeringPlan(
        injection_layer=spec.injection_layer,
        sae_layer=spec.sae_layer,
        ablation_layer=ablation_layer,
        positions=positions,
    )  # type: ignore[arg-type]
    settings = GenerationSettings(
        temperature=temperature,
        repetition_penalty=spec.repetition_penalty,
        max_new_tokens=max_new_tokens,
        chat_template=spec.chat_template,
        batch_size=batch_size,
    )
    return SteeredGenerator(loaded, directions, plan, settings, progress)


def load_generator(
    spec,
    *,
    model_dir: str | None = None,
    device: str | torch.device | None = None,
    engine: str | None = None,
    tp_size: int | None = None,
    median_resid_norm: float | None = None,
    sae_dtype: str = "float32",
    **generator_kwargs: Any,
) -> SteeredGenerator:
    """Load model + SAE for a config model entry (``esr.config.ModelSpec``) and return its ``SteeredGenerator``.
    ``generator_kwargs`` go to ``generator_for_spec`` (temperature, max_new_tokens, batch_size, positions, ...)."""
    from esr.models import load_model
    from esr.sae import load_sae, steering_directions

    loaded = load_model(spec, path=model_dir, device=device, engine=engine, tp_size=tp_size)
    sae = load_sae(spec.sae, device=loaded.device, dtype=sae_dtype)
    directions = steering_directions(spec, sae, median_resid_norm=median_resid_norm)
    return generator_for_spec(spec, loaded, directions, **generator_kwargs)


def load_configured_generator(
    spec, model_dir: str, generation: Mapping[str, Any], max_new_tokens: int | None = None
) -> SteeredGenerator:
    """``load_generator`` with the ``generation`` config block's settings (temperature, max_new_tokens, batch_size,
    steer_positions); ``max_new_tokens`` overrides the block's (the boost calibration's shorter answers)."""
    return load_generator(
        spec,
        model_dir=str(model_dir),
        temperature=generation["temperature"],
        max_new_tokens=max_new_tokens or generation["max_new_tokens"],
        batch_size=generation["batch_size"],
        positions=generation["steer_positions"],
        progress=False,
    )

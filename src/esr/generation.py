"""Batched steered sampling (transformers or DeepSpeed inference), one record per trial.

``SteeredGenerator.generate(requests)`` runs its own decoding loop over the HF model (KV cache, left padding)
instead of ``model.generate`` so that:

- every row samples from its own ``torch.Generator`` seeded with the trial's seed: a row's tokens do not depend on
  the other rows of its batch, and a trial is reproducible from its record (seed + intervention + settings);
- the repetition penalty (vLLM/HF semantics: any token of prompt or output, divided if positive, multiplied if
  negative) ignores pad tokens, so padding does not change a row;
- the SAE activations of *every* generated token are captured, including the last one (one extra forward);
- under DeepSpeed tp>1 every rank samples identically (same seeds, and rank 0's tokens are broadcast).

Interventions (steer / ablate / capture) are applied by ``esr.steering.apply_interventions``.
Chat templates: ``model`` (the tokenizer's own) or ``reference_llama_prompt`` (the authors' engine: after the Llama-3
template, append ``<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>`` token ids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from esr.models import LoadedModel
from esr.records import Intervention
from esr.sae import SteeringDirections
from esr.steering import SteeringPlan, apply_interventions

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
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                         "use chat_template 'none' or a tokenizer that has one")
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
        raise ValueError(f"chat_template 'reference_llama_prompt' needs a Llama-3 tokenizer; "
                         f"{getattr(tokenizer, 'name_or_path', '?')!r} encodes {REFERENCE_LLAMA_SUFFIX!r} as {ids}")
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and attention mask [B, T]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"prompt {i} of the batch encodes to zero tokens")
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens marked in ``seen`` [B, V]: logit / penalty if positive, logit * penalty otherwise."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_rows(logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row; row i uses only ``generators[i]`` (so rows are independent of each other)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def row_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _broadcast_from_rank0(tokens: torch.Tensor) -> torch.Tensor:
    """Under tensor parallelism all ranks must feed the same tokens: take rank 0's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens


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

    def settings_record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.settings)
        out.update(dataclasses.asdict(self.plan))
        out.update({"engine": self.loaded.engine, "tp_size": self.loaded.tp_size, "dtype": str(self.loaded.dtype),
                    "boost_unit": self.directions.boost_unit if self.directions else None,
                    "median_resid_norm": self.directions.median_resid_norm if self.directions else None})
        return out

    def generate(self, requests: Sequence[TrialRequest]) -> list[GenerationResult]:
        """All requests, in batches of ``settings.batch_size``; results in request order."""
        from tqdm.auto import tqdm

        bs = self.settings.batch_size
        chunks = [list(requests[i:i + bs]) for i in range(0, len(requests), bs)]
        results: list[GenerationResult] = []
        for chunk in tqdm(chunks, desc="generate", unit="batch", disable=not self.progress or len(chunks) < 2):
            results.extend(self.generate_batch(chunk))
        return results

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[TrialRequest]) -> list[GenerationResult]:
        lm, s = self.loaded, self.settings
        model, tok, device = lm.model, lm.tokenizer, lm.device
        prompts = [encode_prompt(tok, r.prompt, s.chat_template) for r in requests]
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        B, V = len(requests), int(model.config.vocab_size)
        eos = torch.tensor([] if s.ignore_eos else lm.eos_token_ids(), dtype=torch.long, device=device)
        generators = [row_generator(r.seed, device) for r in requests]
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        real = mask.bool()  # pad positions must not mark the pad id as seen (it may also occur in the prompt)
        seen[torch.arange(B, device=device)[:, None].expand_as(ids)[real], ids[real]] = True
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        n_tokens = torch.zeros(B, dtype=torch.long, device=device)
        steps: list[torch.Tensor] = []
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        interventions = [r.intervention for r in requests]
        with apply_interventions(model, interventions, self.directions, self.plan) as hooks:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
            cache, pos = out.cache, positions[:, -1:]
            for step in range(s.max_new_tokens):
                logits = apply_repetition_penalty(out.logits[:, -1, :].float(), seen, s.repetition_penalty)
                nxt = sample_rows(logits, s.temperature, generators)
                nxt = _broadcast_from_rank0(torch.where(finished, tok.pad_token_id, nxt))
                steps.append(nxt)
                n_tokens += (~finished).long()
                seen[torch.arange(B, device=device), nxt] |= ~finished
                finished |= torch.isin(nxt, eos)
                done = bool(finished.all()) or step == s.max_new_tokens - 1
                if done and not hooks.batch.any_capture:
                    break
                # on the last step this forward only serves capture: HF never runs the final token through
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
                pos = pos + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=True, logits_to_keep=1)
                if done:
                    break
            captured = hooks.captured
        return self._results(requests, prompts, steps, n_tokens, finished, captured, hooks.batch.capture_columns)

    def _results(self, requests, prompts, steps, n_tokens, finished, captured, capture_columns):
        tok = self.loaded.tokenizer
        tokens = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(len(requests), 0, dtype=torch.long)
        decode_acts = torch.cat(captured[1:], dim=1).float().cpu() if len(captured) > 1 else None
        settings = self.settings_record()
        results = []
        for i, req in enumerate(requests):
            n = int(n_tokens[i])
            ids = tokens[i, :n].tolist()
            acts = None
            if req.intervention is not None and req.intervention.capture:
                acts = decode_acts[i, :n][:, capture_columns[i]].clone()
            iv = req.intervention
            steering = (self.directions.describe(iv.steer_latent, iv.boost)
                        if self.directions is not None and iv is not None and iv.steer_latent is not None
                        else {"boost": 0.0, "boost_unit": self.directions.boost_unit if self.directions else None})
            results.append(GenerationResult(
                trial_id=req.trial_id, prompt=req.prompt, seed=req.seed, intervention=iv,
                response=tok.decode(ids, skip_special_tokens=True), token_ids=ids, n_tokens=n,
                finish_reason="eos" if bool(finished[i]) else "length", prompt_token_ids=list(prompts[i]),
                activations=acts, steering=steering, settings=settings))
        return results


def generator_for_spec(spec, loaded: LoadedModel, directions: SteeringDirections | None, *,
                       temperature: float = 0.6, max_new_tokens: int = 512, batch_size: int = 16,
                       positions: str = "all", ablation_layer: int | None = None,
                       progress: bool = True) -> SteeredGenerator:
    """A ``SteeredGenerator`` with the layers, repetition penalty and chat template of a config model entry."""
    plan = SteeringPlan(injection_layer=spec.injection_layer, sae_layer=spec.sae_layer,
                        ablation_layer=ablation_layer, positions=positions)  # type: ignore[arg-type]
    settings = GenerationSettings(temperature=temperature, repetition_penalty=spec.repetition_penalty,
                                  max_new_tokens=max_new_tokens, chat_template=spec.chat_template,
                                  batch_size=batch_size)
    return SteeredGenerator(loaded, directions, plan, settings, progress)


def load_generator(spec, *, model_dir: str | None = None, device: str | torch.device | None = None,
                   engine: str | None = None, tp_size: int | None = None, median_resid_norm: float | None = None,
                   sae_dtype: str = "float32", **generator_kwargs: Any) -> SteeredGenerator:
    """Load model + SAE for a config model entry (``esr.config.ModelSpec``) and return its ``SteeredGenerator``.
    ``generator_kwargs`` go to ``generator_for_spec`` (temperature, max_new_tokens, batch_size, positions, ...)."""
    from esr.models import load_model
    from esr.sae import load_sae, steering_directions

    loaded = load_model(spec, path=model_dir, device=device, engine=engine, tp_size=tp_size)
    sae = load_sae(spec.sae, device=loaded.device, dtype=sae_dtype)
    directions = steering_directions(spec, sae, median_resid_norm=median_resid_norm)
    return generator_for_spec(spec, loaded, directions, **generator_kwargs)

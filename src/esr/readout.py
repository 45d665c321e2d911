"""Read SAE latent activations off a model without generating: one forward pass over given texts.

Used by latent selection (relevance filter: max over the prompt's tokens), off-topic-detector discovery (max over a
user+assistant conversation) and the sequential-activation analysis (per-token activations of an existing answer,
"replay", optionally with the same steering active as during generation)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from esr.episodes import response_token_spans
from esr.generation import left_pad
from esr.models import LoadedModel
from esr.progress import Progress
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan, apply_interventions


def user_turn_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn alone in the chat template, without a generation prompt (the authors' relevance read-out)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=False, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def conversation_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """User prompt + assistant answer in the chat template; also the index of the first answer token."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(head):
        raise ValueError(
            "the chat template does not extend the generation prompt with the answer; cannot locate the answer's tokens"
        )
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return list(ids), len(head_ids)


def answer_token_spans(tokenizer, prompt: str, response: str) -> tuple[list[int], list[tuple[int, int]], int, int, str]:
    """The user+assistant conversation of an existing answer, for replaying it: (token ids, the answer's tokens'
    character spans relative to the stripped answer text, [first, stop) token range of the answer in the ids, the
    stripped answer text). Raises ``ValueError`` when the answer does not appear in its rendered conversation."""
    text = response.strip()
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}], tokenize=False
    )
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    start = full.find(text, len(head) - 1 if len(head) else 0)
    if start < 0:
        raise ValueError("the answer text does not appear in its rendered conversation")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    first, stop, spans = response_token_spans(enc["offset_mapping"], start, start + len(text))
    return list(enc["input_ids"]), spans, first, stop, text


def padded_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of a left-padded batch from its attention mask [B, T] (1 = token, 0 = pad): each row's
    first real token is position 0 (``cumsum - 1``, pads clamped to 0), so a sequence gets the same positions alone
    and in any batch. Without them the model numbers positions by column, which shifts a padded row's rotary
    positions by its pad count: equal in exact arithmetic (RoPE is relative) but not in bf16 (up to 0.09 on a tiny
    Gemma-2, and which latents are exactly zero changes). The same rule as HF ``generate``
    (``prepare_inputs_for_generation``) and ``SteeredGenerator.generate_batch``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def per_token_latents(
    loaded: LoadedModel,
    sae,
    layer: int,
    sequences: Sequence[Sequence[int]],
    latents: Sequence[int] | None = None,
    batch_size: int = 8,
    interventions: Sequence[Intervention | None] | None = None,
    directions: SteeringDirections | None = None,
    plan: SteeringPlan | None = None,
    desc: str = "reading latents",
    *,
    log_progress: bool = True,
) -> list[torch.Tensor]:
    """SAE activations at the output of decoder block ``layer`` for every token of every sequence:
    a list of [len(seq), n_latents] float32 tensors (all latents when ``latents`` is None).

    With ``interventions`` (one per sequence) the forward pass runs under them (e.g. replay with steering).
    Sequences are left-padded into batches of ``batch_size`` and run with :func:`padded_position_ids`, so a
    sequence's read-out does not depend on the other sequences of its batch. With ``log_progress`` one
    ``esr.progress`` line (rate, ETA) is logged per batch; callers that count their own units pass False."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = next(loaded.model.parameters()).device
    cols = torch.tensor(list(latents), dtype=torch.long) if latents is not None else None
    captured: list[torch.Tensor] = []

    def hook(_m, _i, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    out: list[torch.Tensor] = []
    meter = Progress(total=len(sequences), desc=desc, unit="sequences")
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = left_pad(chunk, pad, torch.device("cpu"))
        captured.clear()
        with contextlib.ExitStack() as stack:
            if interventions is not None:
                if plan is None:
                    raise ValueError("replay with interventions needs a SteeringPlan")
                stack.enter_context(
                    apply_interventions(loaded.model, interventions[start : start + batch_size], directions, plan)
                )
            # registered after the intervention hooks: on a shared layer it reads the steered stream
            handle = loaded.layers[layer].register_forward_hook(hook)
            stack.callback(handle.remove)
            loaded.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=padded_position_ids(mask).to(device),
                use_cache=False,
            )
        f = sae.encode(captured[-1].to(sae.W_dec.dtype)).float().cpu()
        if cols is not None:
            f = f[..., cols]
        width = ids.shape[1]
        for i, s in enumerate(chunk):
            out.append(f[i, width - len(s) :].clone())
        if log_progress:
            meter.update(len(chunk))  # one line per batch (detector discovery, sequential replay), counted in sequences
    return out


def max_pooled_latents(
    loaded: LoadedModel,
    sae,
    layer: int,
    sequences: Sequence[Sequence[int]],
    batch_size: int = 8,
    desc: str = "max-pooling latents",
) -> np.ndarray:
    """[n_sequences, d_sae]: each latent's maximum activation over each sequence's tokens."""
    per_tok = per_token_latents(loaded, sae, layer, sequences, None, batch_size, desc=desc)
    return np.stack([t.max(dim=0).values.numpy() for t in per_tok])


def prompt_relevance_activations(
    loaded: LoadedModel, sae, layer: int, prompts: Sequence[str], batch_size: int = 1
) -> np.ndarray:
    """The relevance-filter input: [n_prompts, d_sae] max over each prompt's user-turn tokens (paper Sec. 2.2; the
    authors' code keeps a latent only if this is exactly 0.0 on every prompt, reference protocol Sec. 2).

    One prompt per forward by default (``batch_size=1``): with position ids the padding no longer shifts positions,
    but a batched bf16 forward is still not bit-stable under padding (e.g. CPU SDPA blocks its reduction over the
    padded key length: ~2e-4 on a residual), which can flip a latent sitting at its JumpReLU threshold and so make
    the exact-zero test depend on batch partners. The prompts are few (38 in the paper), so this costs little."""
    seqs = [user_turn_ids(loaded.tokenizer, p) for p in prompts]
    return max_pooled_latents(loaded, sae, layer, seqs, batch_size, desc="prompt read-out")

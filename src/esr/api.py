"""The Python API for developers who test their own model (issue 13): load any decoder-only HF causal LM, load an
SAE, and generate a steered answer. ``esr.probe`` (``esr.probing.probe``) runs the whole protocol on top of these.

    import esr
    model = esr.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")          # HF id (hub cache) or a folder
    sae = esr.load_sae(sae_dir="esr-probe/resources/sae/smollm2-135m-instruct")
    out = esr.steer(model, sae, "How do you bake bread?", latent=123, boost=0.5, layer=15,
                    boost_unit="median_resid_norm", median_resid_norm=7.9)
    print(out.response)

Steering (paper Sec. 2.1; ``esr.steering``): during every forward pass the vector ``c * W_dec[latent]`` is added
to the output of decoder block ``layer`` (the residual stream, ``hidden_states[layer + 1]``), at every position
(``positions="all"``, the authors' engine) or at generated tokens only. ``c`` is the boost itself for
``boost_unit="raw"``, and ``boost * median_resid_norm / ||W_dec[latent]||`` for ``"median_resid_norm"`` (a boost of 1
adds a vector as long as the median residual norm at that layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from esr.generation import GenerationResult, GenerationSettings, SteeredGenerator, TrialRequest
from esr.models import LoadedModel, load_model_dir
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan


def load_model(
    model: str | Path, *, revision: str | None = None, dtype: str = "float32", device: str | None = None
) -> LoadedModel:
    """Model + tokenizer of ``model`` (a local HF folder, or an HF id through the hub cache; ``HF_HUB_OFFLINE=1``
    honoured), ready for batched steered generation (left padding). Any decoder-only causal LM whose decoder blocks
    ``esr.models.decoder_layers`` finds (Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3, OLMo, GPT-NeoX, ...).
    Raises ``esr.probing.ProbeError`` (neither a folder nor a cached/downloadable id), ``TypeError`` (no decoder
    blocks found: names the class)."""
    from esr.probing import resolve_model

    resolved = resolve_model(str(model), revision)
    return load_model_dir(resolved.path, dtype=dtype, device=device)


def load_sae(sae: str | None = None, *, sae_dir: str | Path | None = None, device: str = "cpu") -> Any:
    """A ``sae_lens.SAE`` from a sae-lens pretrained ``RELEASE/ID`` or a local sae-lens folder (``cfg.json`` +
    ``sae_weights.safetensors``), in eval mode. ``W_dec`` is [d_sae, d_model]."""
    from sae_lens import SAE

    if (sae is None) == (sae_dir is None):
        raise ValueError("give exactly one of sae='RELEASE/ID' or sae_dir=FOLDER")
    if sae_dir is not None:
        if not (Path(sae_dir) / "cfg.json").is_file():
            raise FileNotFoundError(f"no sae-lens SAE in {str(sae_dir)!r} (cfg.json missing)")
        return SAE.load_from_disk(str(sae_dir), device=device).eval()
    release, _, sae_id = sae.partition("/")
    if not sae_id:
        raise ValueError(f"sae {sae!r}: expected RELEASE/ID")
    return SAE.from_pretrained(release, sae_id, device=device).eval()


def steer(
    model: LoadedModel,
    sae: Any,
    prompt: str,
    *,
    latent: int | None,
    boost: float,
    layer: int,
    sae_layer: int | None = None,
    boost_unit: str = "raw",
    median_resid_norm: float | None = None,
    positions: str = "all",
    seed: int = 0,
    temperature: float = 0.6,
    max_new_tokens: int = 128,
    repetition_penalty: float = 1.0,
    capture: bool = False,
) -> GenerationResult:
    """One answer to ``prompt`` (the model's chat template applied) with ``boost`` of SAE latent ``latent`` added at
    the output of decoder block ``layer`` (``latent=None``: unsteered). ``sae_layer``: the block the SAE reads (for
    ``capture``; default ``layer``). ``capture=True`` records the latent's SAE activation per generated token
    (``result.activations``: [n_tokens, 1]). Sampling is seeded per row, so a batch equals each row alone.
    Raises ``ValueError`` for a latent outside the SAE, a layer outside the model or a unit without its norm."""
    device = next(model.model.parameters()).device
    directions = SteeringDirections(sae=sae.to(device), boost_unit=boost_unit, median_resid_norm=median_resid_norm)
    if latent is not None:
        directions.check_latent(latent)
    plan = SteeringPlan(injection_layer=layer, sae_layer=layer if sae_layer is None else sae_layer, positions=positions)
    plan.check(model.n_layers)
    settings = GenerationSettings(
        temperature=temperature, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, batch_size=1
    )
    gen = SteeredGenerator(model, directions, plan, settings, progress=False)
    iv = Intervention(
        steer_latent=latent,
        boost=float(boost) if latent is not None else 0.0,
        capture=(latent,) if capture and latent is not None else (),
    )
    with torch.inference_mode():
        return gen.generate([TrialRequest(prompt, seed, iv)])[0]

"""Model + tokenizer loading for decoder-only HF causal LMs (the paper's Llama-3, Gemma-2 and SmolLM2, and any other
decoder-only architecture, see :func:`decoder_layers`) from a local HF directory.

The architecture family (``esr.config.MODEL_FAMILIES``: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, olmo,
olmo2, olmo3, gpt_neox, smollm3) is optional: :func:`infer_family` reads it from ``config.json``'s ``model_type``;
a configured family must agree with it. Models of other decoder-only architectures load too (family ``None``).

The directory (``resources/models/<name>/`` from the download rule, or ``path`` for ``source: local``) holds the
model weights and the tokenizer. The tokenizer is set up for batched generation: left padding and a pad token.

``engine: deepspeed`` wraps the model with ``deepspeed.init_inference`` (explicit dtype, AutoTP
``tensor_parallel={"tp_size": N}``, kernel injection off). AutoTP keeps the HF decoder layers, so the steering hooks
(``esr.steering``) are registered on ``LoadedModel.model`` (= ``engine.module``) exactly as without DeepSpeed and see
the full, all-reduced residual stream on every rank.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esr.config import FAMILY_OF_MODEL_TYPE, MODEL_FAMILIES, ModelSpec
from esr.config import ModelFamily as ModelFamily  # re-exported: the registry's entry type
from esr.config import family_from_hf_id as family_from_hf_id  # re-exported
from esr.config import infer_family as infer_family  # re-exported: family of an HF model_type / config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The architecture families esr is tested on (name -> :class:`esr.config.ModelFamily`); same object as
#: ``esr.config.MODEL_FAMILIES``.
FAMILIES: dict[str, ModelFamily] = MODEL_FAMILIES
ENGINES = ("transformers", "deepspeed")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a decoder-only HF causal LM (``model``, or a DeepSpeed ``engine.module``), as the
    ``nn.ModuleList`` of ``n_layers`` blocks (e.g. ``model.model.layers`` for Llama/Mistral/Qwen/Gemma/Phi-3/OLMo,
    ``model.gpt_neox.layers`` for GPT-NeoX, ``model.transformer.h`` for GPT-2, ``model.model.language_model.layers``
    for the multimodal Gemma-3 wrapper).

    Block ``L``'s output (what the steering hooks change) is the residual stream after block ``L``: TransformerLens's
    ``blocks.L.hook_resid_post`` and HF's ``hidden_states[L+1]`` (``output_hidden_states=True``) for every block but
    the last; HF's last entry ``hidden_states[n_layers]`` is taken after the final norm, so it is *not* the last
    block's output (checked per family in ``tests/test_architectures.py``).

    Found via the model's own API, ``model.get_decoder()`` (transformers ``PreTrainedModel``), then by searching that
    decoder for the ``nn.ModuleList`` whose length is the text config's ``num_hidden_layers`` (the shallowest such
    list; two at the same depth are ambiguous). Raises ``TypeError`` naming the model class when ``model`` is not an
    HF model, is encoder-decoder or not a causal LM (``can_generate()`` false: encoder-only or headless), or when no
    unique block list is found."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError(
            f"{name} is not a Hugging Face transformers model (no .config); esr steers the decoder blocks of "
            "decoder-only HF causal LMs (AutoModelForCausalLM)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{name} is an encoder-decoder model; esr steers decoder-only causal LMs")
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        raise TypeError(
            f"{name} is not a causal LM (can_generate() is False: an encoder-only or headless model); esr steers "
            "decoder-only causal LMs (AutoModelForCausalLM)"
        )
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise TypeError(f"{name}: its config has no num_hidden_layers, so its decoder blocks cannot be identified")
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    layers = _find_block_list(decoder, n_layers)
    if layers is None and decoder is not model:
        layers = _find_block_list(model, n_layers)
    if layers is None:
        raise TypeError(
            f"{name}: found no decoder blocks, i.e. no nn.ModuleList of num_hidden_layers = {n_layers} modules in "
            f"{type(decoder).__name__} (model.get_decoder()) or in the model"
        )
    return layers


def _find_block_list(module: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList | None:
    """The shallowest ``nn.ModuleList`` of length ``n_layers`` under ``module``; ``None`` if there is none; a
    ``TypeError`` when two lie at the same, shallowest depth."""
    found = [
        (path.count(".") if path else -1, path, sub)
        for path, sub in module.named_modules()
        if isinstance(sub, torch.nn.ModuleList) and len(sub) == n_layers
    ]
    if not found:
        return None
    depth = min(d for d, _, _ in found)
    best = [(path, sub) for d, path, sub in found if d == depth]
    if len(best) > 1:
        raise TypeError(
            f"{type(module).__name__}: the decoder blocks are ambiguous, {len(best)} nn.ModuleLists of "
            f"num_hidden_layers = {n_layers} modules: {', '.join(path for path, _ in best)}"
        )
    return best[0][1]


def check_family(*, family: str | None, model_type: str | None, where: str = "model") -> str | None:
    """The family to use for a model whose ``config.json`` says ``model_type``: ``family`` when given (it must be a
    :data:`FAMILIES` key and agree with ``model_type``), else the family inferred from ``model_type``, or ``None``
    for a decoder-only architecture outside the registry (loaded generically). ``where`` names the model in errors.

    Raises ``ValueError`` naming both when a configured family contradicts the config's ``model_type``, or when
    ``family`` is not a registry name."""
    if family is None:
        return FAMILY_OF_MODEL_TYPE.get(model_type) if model_type else None
    if family not in FAMILIES:
        raise ValueError(f"{where}: family {family!r} is not one of {tuple(FAMILIES)}")
    if model_type is not None and model_type not in FAMILIES[family].model_types:
        raise ValueError(
            f"{where}: the configured family {family!r} contradicts the model's config.json model_type "
            f"{model_type!r} (family {FAMILY_OF_MODEL_TYPE.get(model_type)!r}); fix or drop models.*.family"
        )
    return family


def prepare_tokenizer(tokenizer):
    """Left padding (batched generation) and a pad token (eos when the tokenizer has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither pad nor eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(eq=False)
class LoadedModel:
    """A causal LM ready for steered generation. ``model`` is the module to hook and call (``engine.module``
    under DeepSpeed); ``ds_engine`` keeps the DeepSpeed engine alive."""

    model: Any
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device
    engine: str = "transformers"
    tp_size: int = 1
    path: str | None = None
    ds_engine: Any = None
    family: str | None = None  # a FAMILIES key, or None for an architecture outside the registry

    @property
    def layers(self) -> torch.nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: the tokenizer's eos plus the generation config's (Llama-3 has 3)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if eos is not None:
            ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return sorted(ids)


def disable_deepspeed_shm_allreduce() -> None:
    """CPU-only workaround: DeepSpeed's JIT-built shm all-reduce op segfaults on some CPUs under AutoTP tp>1; with
    this, ``inference_all_reduce`` falls back to torch.distributed (gloo). Call before ``deepspeed.init_distributed``
    (the op is built when the comm backend starts; ``init_inference`` starts it if nobody did).
    (The module is taken from ``sys.modules``: ``deepspeed.comm`` re-exports a ``torch`` name that shadows the
    submodule attribute.)"""
    import deepspeed.comm.torch  # noqa: F401  (registers the submodule in sys.modules)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_deepspeed(model, dtype: torch.dtype, tp_size: int = 1):
    """Wrap ``model`` with DeepSpeed inference (AutoTP, no kernel injection). Returns the InferenceEngine."""
    import deepspeed

    if tp_size < 1:
        raise ValueError(f"tensor_parallel tp_size {tp_size} must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp_size > world:
        raise ValueError(
            f"tensor_parallel tp_size {tp_size} needs {tp_size} processes, but WORLD_SIZE is {world}; "
            "launch with torchrun/deepspeed --nproc_per_node"
        )
    if tp_size > 1 and not torch.cuda.is_available():
        disable_deepspeed_shm_allreduce()
    return deepspeed.init_inference(
        model, dtype=dtype, tensor_parallel={"tp_size": tp_size}, replace_with_kernel_inject=False
    )


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bf16 on this CPU (AVX512-BF16 / AMX); without it bf16 matmuls are emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_model_dir(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    engine: str = "transformers",
    tp_size: int = 1,
    family: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer from a local HF directory (config.json, weights, tokenizer files).

    ``family``: optional; inferred from ``config.json``'s ``model_type`` when ``None`` (see :func:`check_family`,
    which raises ``ValueError`` when a given family contradicts it). Families with ``eager_attention`` (Gemma-2),
    and any model whose config sets ``attn_logit_softcapping``, load with ``attn_implementation="eager"``.
    Raises ``FileNotFoundError`` without ``config.json``; ``ValueError`` for a bad engine/tp_size/dtype/family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {str(path)!r} (config.json missing); run the download rule first")
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if engine == "transformers" and tp_size != 1:
        raise ValueError(f"tensor_parallel {tp_size} > 1 needs engine 'deepspeed'")
    torch_dtype = resolve_dtype(dtype)
    if (
        torch_dtype == torch.bfloat16
        and (device is None or torch.device(device).type == "cpu")
        and not torch.cuda.is_available()
        and not cpu_supports_bf16()
    ):
        import logging

        logging.getLogger("esr.models").warning(
            "this CPU has no bf16 units: loading %s in float32 instead of "
            "bfloat16 (slower, same results up to rounding)",
            path,
        )
        torch_dtype = torch.float32
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)))
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    raw_config = _read_config(path)
    model_type = raw_config.get("model_type")
    family = check_family(family=family, model_type=model_type, where=f"model at {str(path)!r}")
    if (family is not None and FAMILIES[family].eager_attention) or _softcaps(raw_config):
        kwargs["attn_implementation"] = "eager"  # attention-logit soft-capping: eager kernel only
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    return wrap_model(
        model,
        tokenizer,
        dtype=torch_dtype,
        device=device,
        engine=engine,
        tp_size=tp_size,
        path=str(path),
        family=family,
    )


def wrap_model(
    model,
    tokenizer,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    engine: str = "transformers",
    tp_size: int = 1,
    path: str | None = None,
    family: str | None = None,
) -> LoadedModel:
    """Put an in-memory HF model on its engine (used by ``load_model_dir`` and by tests with tiny models).
    ``family``: inferred from ``model.config.model_type`` when ``None`` (``None`` outside the registry)."""
    torch_dtype = resolve_dtype(dtype)
    family = check_family(
        family=family, model_type=getattr(model.config, "model_type", None), where=type(model).__name__
    )
    decoder_layers(model)  # fail early, naming the class, for a model whose decoder blocks cannot be found
    model = model.to(dtype=torch_dtype).eval()
    prepare_tokenizer(tokenizer)
    if engine == "deepspeed":
        ds_engine = init_deepspeed(model, torch_dtype, tp_size)
        module = ds_engine.module.eval()
        dev = next(module.parameters()).device
        return LoadedModel(module, tokenizer, torch_dtype, dev, "deepspeed", tp_size, path, ds_engine, family)
    if engine != "transformers":
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    dev = torch.device(device) if device is not None else default_device()
    model = model.to(dev)
    return LoadedModel(model, tokenizer, torch_dtype, dev, "transformers", 1, path, None, family)


def load_model(
    spec: ModelSpec,
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    engine: str | None = None,
    tp_size: int | None = None,
) -> LoadedModel:
    """Load the model a config entry names, from ``path`` or the spec's local dir (``resources/models/<name>``).
    ``spec.family`` may be ``None`` (inferred from the model's ``config.json``). Raises ``ValueError`` for a family
    outside :data:`FAMILIES` or one that contradicts the model's ``model_type``."""
    from esr.sae import resolve_path

    if spec.family is not None and spec.family not in FAMILIES:
        raise ValueError(f"model {spec.name!r}: family {spec.family!r} is not one of {tuple(FAMILIES)}")
    model_dir = Path(path) if path is not None else resolve_path(spec.local_dir)
    return load_model_dir(
        model_dir,
        dtype=spec.dtype,
        device=device,
        engine=engine or spec.engine,
        tp_size=tp_size or spec.tensor_parallel,
        family=spec.family,
    )


def _read_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory (``{}`` when unreadable: transformers then names the error)."""
    import json

    try:
        with open(path / "config.json", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _softcaps(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` (or its ``text_config``) sets attention-logit soft-capping."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return any(c.get("attn_logit_softcapping") is not None for c in (config, text))

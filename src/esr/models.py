"""Model + tokenizer loading for Llama-3, Gemma-2 and SmolLM2 (a Llama) from a local HF directory.

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

from esr.config import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILIES = ("llama", "gemma2")
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
    """The decoder blocks (``model.model.layers``) of a Llama/Gemma-2 causal LM; layer L's output is
    ``hidden_states[L+1]`` and TransformerLens's ``blocks.L.hook_resid_post``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no .model.layers; only Llama/Gemma-2 style causal LMs are supported"
        )
    return layers


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

    @property
    def layers(self) -> torch.nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

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
    """Load model + tokenizer from a local HF directory (config.json, weights, tokenizer files)."""
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
    model_type = _model_type(path)
    if family == "gemma2" or model_type == "gemma2":
        kwargs["attn_implementation"] = "eager"  # logit soft-capping
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    return wrap_model(
        model, tokenizer, dtype=torch_dtype, device=device, engine=engine, tp_size=tp_size, path=str(path)
    )


def wrap_model(
    model,
    tokenizer,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    engine: str = "transformers",
    tp_size: int = 1,
    path: str | None = None,
) -> LoadedModel:
    """Put an in-memory HF model on its engine (used by ``load_model_dir`` and by tests with tiny models)."""
    torch_dtype = resolve_dtype(dtype)
    model = model.to(dtype=torch_dtype).eval()
    prepare_tokenizer(tokenizer)
    if engine == "deepspeed":
        ds_engine = init_deepspeed(model, torch_dtype, tp_size)
        module = ds_engine.module.eval()
        dev = next(module.parameters()).device
        return LoadedModel(module, tokenizer, torch_dtype, dev, "deepspeed", tp_size, path, ds_engine)
    if engine != "transformers":
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    dev = torch.device(device) if device is not None else default_device()
    model = model.to(dev)
    return LoadedModel(model, tokenizer, torch_dtype, dev, "transformers", 1, path, None)


def load_model(
    spec: ModelSpec,
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    engine: str | None = None,
    tp_size: int | None = None,
) -> LoadedModel:
    """Load the model a config entry names, from ``path`` or the spec's local dir (``resources/models/<name>``)."""
    from esr.sae import resolve_path

    if spec.family not in FAMILIES:
        raise ValueError(f"model {spec.name!r}: family {spec.family!r} is not one of {FAMILIES}")
    model_dir = Path(path) if path is not None else resolve_path(spec.local_dir)
    return load_model_dir(
        model_dir,
        dtype=spec.dtype,
        device=device,
        engine=engine or spec.engine,
        tp_size=tp_size or spec.tensor_parallel,
        family=spec.family,
    )


def _model_type(path: Path) -> str | None:
    import json

    try:
        with open(path / "config.json", encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None

"""Tiny offline models and SAEs for tests (no downloads): Llama, Gemma-2 and any other decoder-only causal LM
(``tiny_causal_lm``) built from transformers configs, SAEs built from sae-lens configs, and a tiny word-level
tokenizer. Importable by tests and by benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = (
    "the a an of to and in is it that how do you explain make bake bread car tire budget letter water dog cat "
    "wait , . ! ? not right let me start over again sorry i got off track actually answer first then step"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer with a chat template, pad/eos/bos tokens; vocab ~70."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(TINY_WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
        "{% else %}<assistant> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tok.padding_side = "left"
    return tok


def tiny_llama(vocab_size: int = 128, n_layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random tiny Llama (``tiny_causal_lm("llama")``)."""
    return tiny_causal_lm("llama", vocab_size=vocab_size, n_layers=n_layers, hidden=hidden, seed=seed)


def tiny_gemma2(vocab_size: int = 128, n_layers: int = 4, hidden: int = 64, seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    head_dim = hidden // 4
    cfg = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(cfg).eval()


def tiny_causal_lm(model_type: str, *, vocab_size: int = 128, n_layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random decoder-only HF causal LM of any ``model_type`` (``AutoConfig.for_model`` +
    ``AutoModelForCausalLM.from_config``; 4 heads, 2 KV heads, pad/bos/eos = 0/1/2). ``model_type="gemma3"`` builds
    the multimodal ``Gemma3ForConditionalGeneration`` with a tiny SigLIP vision tower of ``n_layers`` layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    head_dim = hidden // 4
    kw: dict = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    text_type = "gemma3_text" if model_type == "gemma3" else model_type
    gemma = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": 64}
    extra = {"gemma": {"head_dim": head_dim}, "gemma2": gemma, "gemma3_text": gemma, "qwen3": {"head_dim": head_dim}}
    kw.update(extra.get(text_type, {}))
    if text_type == "gpt_neox":
        del kw["num_key_value_heads"]  # multi-head attention only
    if model_type == "gemma3":
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(  # 28 / 14 = 2 x 2 patches: mm_tokens_per_image = 4
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = Gemma3Config(
            text_config=Gemma3TextConfig(**kw),
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=vocab_size - 3,
            eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1,
        )
    else:
        cfg = AutoConfig.for_model(model_type, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_sae(d_in: int = 64, d_sae: int = 256, kind: str = "jumprelu", seed: int = 0, layer: int = 2):
    """A random sae-lens SAE. ``kind``: 'jumprelu' (GemmaScope-like, unit-norm decoder rows) or 'standard'
    (Goodfire-like ReLU SAE whose decoder rows are *not* unit norm)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    if kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
            w = torch.randn(d_sae, d_in)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            sae.threshold.fill_(0.05)
            sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
    elif kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
            sae.W_dec.copy_(torch.randn(d_sae, d_in) * 0.3)
            sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
    else:
        raise ValueError(f"unknown tiny SAE kind {kind!r}; use 'jumprelu' or 'standard'")
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return sae.eval()


def save_tiny_model_dir(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TINY_PROMPTS = (
    "how do you bake bread",
    "explain how to make water",
    "how do you explain a dog",
    "explain how the car and the tire",
    "how do you make a budget letter",
    "explain how to answer first",
)
TINY_LABELS = ("dog, cat", "bread, water", "car, tire", "letter, budget", "", "feature_5")


def write_tiny_workflow(
    root: str | Path,
    *,
    judge_backend: str = "fake",
    d_sae: int = 64,
    n_latents: int = 4,
    trials_per_latent: int = 2,
    max_new_tokens: int = 8,
) -> Path:
    """Write a complete tiny-model workflow config (tiny Llama + tokenizer, a local sae-lens SAE, a label CSV, a
    prompt list) under ``root`` and return the config path. Every experiment is switched on, with tiny sizes;
    used by the DAG tests (dry run and full run) and by in-process stage tests."""
    import yaml

    root = Path(root)
    model_dir = save_tiny_model_dir(tiny_llama(vocab_size=len(tiny_tokenizer())), tiny_tokenizer(), root / "tiny_model")
    sae = tiny_sae(d_in=64, d_sae=d_sae, kind="standard", layer=2)
    sae.save_model(str(root / "tiny_sae"))
    labels = "latent,label,frequency\n" + "".join(
        f'{j},"{TINY_LABELS[j % len(TINY_LABELS)]}",{0.0 if j % 9 == 8 else 0.01}\n' for j in range(d_sae)
    )
    (root / "labels.csv").write_text(labels)
    (root / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    judge = {"backend": judge_backend, "cache_dir": str(root / "judge_cache")}
    if judge_backend == "offline_minilm":
        judge["anchors"] = "auto"
    config = {
        "run_name": "tiny",
        "seed": 7,
        "prompts": {"source": "file", "path": str(root / "prompts.txt")},
        "models": {
            "tiny-llama": {
                "hf_id": "esr-test/tiny-llama",
                "source": "local",
                "path": str(model_dir),
                "revision": "local",
                "family": "llama",
                "n_layers": 4,
                "n_params": 1.0e5,
                "dtype": "float32",
                "injection_layer": 1,
                "sae_layer": 2,
                "repetition_penalty": 1.1,
                "sae": {"source": "local", "path": str(root / "tiny_sae"), "boost_unit": "raw"},
                "boost": {"prior_mean": 4.0, "prior_std": 3.0, "lower": 0.0, "upper": 12.0},
                "labels": {"source": "file", "path": str(root / "labels.csv")},
            }
        },
        "judge": judge,
        "threshold_judge": dict(judge),
        "concreteness": {"backend": "wordnet", "threshold": 0},
        "generation": {"temperature": 0.6, "max_new_tokens": max_new_tokens, "batch_size": 8},
        "selection": {
            "n_latents": n_latents,
            "trials_per_latent": trials_per_latent,
            "concreteness_threshold": 0,
            "relevance_filter": "none",
        },
        "calibration": {"target": 0.3, "n_steps": 3, "samples_per_step": 2, "max_new_tokens": max_new_tokens},
        "latent_shards": 2,
        "detectors": {
            "min_shuffled_rate": 0.5,
            "max_latents": 6,
            "top_auc_k": 4,
            "random_control": {"n_sets": 2, "match_to": "discovered_top_auc"},
        },
        "experiments": {
            "no_steering": True,
            "ablation": ["discovered_separability", "discovered_top_auc"],
            "random_control": True,
            "boost_sweep": {
                "enabled": True,
                "n_latents": 2,
                "prompts_per_latent": 1,
                "n_levels": 3,
                "sd_range": 2.0,
                "relative_levels": [0.5, 1.0],
            },
            "meta_prompts": {"variants": ["self_monitor", "ignore_latent_label"]},
            "planted_control": {"enabled": True, "fraction": 1.0},
        },
        "cross_judge": {
            "n_samples": 4,
            "judges": {"fake_gated": {"backend": "fake", "restart_gate": True, "cache_dir": str(root / "judge_cache")}},
        },
        "sequential": {"n_baseline": 4, "replay_steering": False, "primary_group": "discovered_top_auc", "n_boot": 50},
        "audit": {"model_map": {"llama-3.3-70b": "tiny-llama"}},
    }
    path = root / "tiny_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_tiny_probe_inputs(root: str | Path, *, d_sae: int = 64, model_type: str = "llama") -> dict[str, Path]:
    """A tiny random causal LM folder (``model_type``: any of :func:`tiny_causal_lm`'s; default a Llama), a local sae-lens SAE reading its block 2 and a label CSV for that SAE, under
    ``root``: the inputs of a one-minute ``esr probe`` smoke run (``python -m esr.testing tiny-probe DIR``).
    Returns ``{"model": ..., "sae": ..., "labels": ...}``. Random weights: the numbers mean nothing."""
    root = Path(root)
    vocab = len(tiny_tokenizer())
    lm = tiny_llama(vocab_size=vocab) if model_type == "llama" else tiny_causal_lm(model_type, vocab_size=vocab)
    model = save_tiny_model_dir(lm, tiny_tokenizer(), root / "model")
    sae = tiny_sae(d_in=64, d_sae=d_sae, kind="standard", layer=2)
    sae.save_model(str(root / "sae"))
    (root / "labels.csv").write_text(
        "latent,label,frequency\n"
        + "".join(f'{j},"{TINY_LABELS[j % len(TINY_LABELS)]}",{0.0 if j % 9 == 8 else 0.01}\n' for j in range(d_sae))
    )
    return {"model": model, "sae": root / "sae", "labels": root / "labels.csv"}


if __name__ == "__main__":  # python -m esr.testing tiny-probe DIR
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "tiny-probe":
        raise SystemExit("usage: python -m esr.testing tiny-probe DIR")
    for name, path in write_tiny_probe_inputs(sys.argv[2]).items():
        print(f"{name}: {path}")

"""Tiny offline models and SAEs for tests (no downloads): Llama and Gemma-2 built from transformers configs, SAEs
built from sae-lens configs, and a tiny word-level tokenizer. Importable by tests and by benchmark scripts."""

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
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
        "{% else %}<assistant> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tok.padding_side = "left"
    return tok


def tiny_llama(vocab_size: int = 128, n_layers: int = 4, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma2(vocab_size: int = 128, n_layers: int = 4, hidden: int = 64, seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    head_dim = hidden // 4
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                       query_pre_attn_scalar=head_dim, sliding_window=64, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


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

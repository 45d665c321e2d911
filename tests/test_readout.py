import pytest
import torch

from esr.models import wrap_model
from esr.readout import conversation_ids, max_pooled_latents, per_token_latents, user_turn_ids
from esr.testing import tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)


def _loaded():
    return wrap_model(tiny_llama(), tiny_tokenizer(), dtype="float32", device="cpu")


def test_per_token_readout_matches_an_independent_forward_and_ignores_padding():
    loaded, sae = _loaded(), tiny_sae(d_in=64, d_sae=32)
    seqs = [[1, 10, 11, 12, 13, 14], [1, 20, 21]]
    acts = per_token_latents(loaded, sae, 2, seqs, latents=[3, 5, 7], batch_size=2)
    for s, a in zip(seqs, acts):
        with torch.no_grad():
            h = loaded.model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[3][0]
            ref = sae.encode(h)[:, [3, 5, 7]]
        assert a.shape == (len(s), 3)
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)


def test_max_pool_and_templates():
    loaded, sae = _loaded(), tiny_sae(d_in=64, d_sae=32)
    tok = loaded.tokenizer
    ids = user_turn_ids(tok, "how do you bake bread")
    assert tok.decode(ids).count("<assistant>") == 0
    conv, start = conversation_ids(tok, "how do you bake bread", "first the water")
    assert tok.decode(conv[start:]).strip().startswith("first")
    pooled = max_pooled_latents(loaded, sae, 2, [ids, conv])
    assert pooled.shape == (2, 32)
    per_tok = per_token_latents(loaded, sae, 2, [conv])[0]
    torch.testing.assert_close(torch.from_numpy(pooled[1]), per_tok.max(0).values)


# ---------------------------------------------------------------------------------------------------------------
# batch invariance under left padding (position ids from the attention mask)

SEQS = [[1] + [7 + (i * 5 + j) % 60 for j in range(n)] for i, n in enumerate((30, 3, 12, 1, 21))]


def _family_model(family: str, dtype: str, attn: str | None = None):
    from esr.testing import tiny_gemma2

    tok = tiny_tokenizer()
    model = (tiny_llama if family == "llama" else tiny_gemma2)(vocab_size=len(tok))
    if attn is not None:
        model.set_attn_implementation(attn)
    return wrap_model(model, tok, dtype=dtype, device="cpu")


def test_padded_position_ids_count_from_each_rows_first_token():
    from esr.generation import left_pad
    from esr.readout import padded_position_ids

    _, mask = left_pad([[5, 6, 7], [8]], 0, torch.device("cpu"))
    assert padded_position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_readout_of_a_sequence_is_the_same_alone_and_in_any_batch(family, dtype):
    """A sequence's read-out must not depend on which sequences share its batch (the relevance filter keeps latents
    that are exactly zero on every prompt). Without position ids a padded row's rotary positions were shifted by its
    pad count: in bf16 that moved values by up to 0.09 and changed which latents are exactly zero.

    bf16 runs eager attention: CPU SDPA's bf16 kernel blocks its reduction over the padded key length, which alone
    moves a padded row's residual by ~2e-4 (kernel noise, not positions; see ``prompt_relevance_activations``)."""
    loaded = _family_model(family, dtype, attn="eager" if dtype == "bfloat16" else None)
    sae = tiny_sae(d_in=64, d_sae=256)  # the SAE runs in fp32, as in the stages
    alone = [per_token_latents(loaded, sae, 2, [s])[0] for s in SEQS]
    batched = {
        "all five": per_token_latents(loaded, sae, 2, SEQS, batch_size=5),
        "pairs": per_token_latents(loaded, sae, 2, SEQS, batch_size=2),
        "reversed": per_token_latents(loaded, sae, 2, SEQS[::-1], batch_size=5)[::-1],
    }
    n_zero = sum(int((a == 0).sum()) for a in alone)
    assert 0 < n_zero < sum(a.numel() for a in alone)  # the zero pattern is informative
    for name, acts in batched.items():
        for i, (a, b) in enumerate(zip(alone, acts)):
            assert a.shape == b.shape == (len(SEQS[i]), 256)
            if dtype == "float32":
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}, seq {i}: {m}")
            else:
                assert torch.equal(a == 0, b == 0), f"{name}, seq {i}: the exactly-zero latents differ"
                torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}, seq {i}: {m}")
    pooled = [max_pooled_latents(loaded, sae, 2, SEQS, batch_size=bs) for bs in (1, 2, 5)]
    assert (pooled[0] == 0).tolist() == (pooled[1] == 0).tolist() == (pooled[2] == 0).tolist()


def test_relevance_readout_runs_each_prompt_alone():
    """The relevance filter's input is exactly each prompt's unpadded read-out, whatever the other prompts (bf16,
    default SDPA attention, where batching with padding is not bit-stable)."""
    from esr.readout import prompt_relevance_activations

    loaded, sae = _family_model("llama", "bfloat16"), tiny_sae(d_in=64, d_sae=256)
    prompts = ["how do you bake bread", "explain", "how do you make a budget letter and explain the car and the tire"]
    acts = prompt_relevance_activations(loaded, sae, 2, prompts)
    for i, p in enumerate(prompts):
        ids = user_turn_ids(loaded.tokenizer, p)
        assert (acts[i] == per_token_latents(loaded, sae, 2, [ids])[0].max(0).values.numpy()).all()
    assert (prompt_relevance_activations(loaded, sae, 2, prompts[::-1])[::-1] == acts).all()

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

"""The speed paths of ``esr.generation`` change no result: batched multinomial sampling (same tokens and generator
states as ``torch.multinomial`` per row), the preallocated KV cache, and dropping finished rows from the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esr.generation import GenerationSettings, SteeredGenerator, TrialRequest, decode_cache, multinomial_rows
from esr.models import wrap_model
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan
from esr.testing import tiny_gemma2, tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)

LAYER = 2
WORDS = "how do you bake bread the cat and dog water car tire budget letter".split()


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def loaded(request):
    tok = tiny_tokenizer()
    model = (tiny_llama if request.param == "llama" else tiny_gemma2)(vocab_size=len(tok))
    return wrap_model(model, tok, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def directions():
    return SteeringDirections(tiny_sae(kind="jumprelu", layer=LAYER), "raw")


def test_multinomial_rows_is_torch_multinomial_per_row():
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        probs = torch.softmax(3 * torch.randn(5, 1000, generator=g) / 0.6, dim=-1)
        seeds = [trial * 10 + i for i in range(5)]
        ref_gens = [torch.Generator().manual_seed(s) for s in seeds]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        for _ in range(3):  # consecutive draws: the generators advance identically
            ref = torch.cat([torch.multinomial(probs[i], 1, generator=rg) for i, rg in enumerate(ref_gens)])
            assert torch.equal(multinomial_rows(probs, gens), ref)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, ref_gens))


def test_multinomial_rows_rejects_invalid_probabilities():
    gens = [torch.Generator().manual_seed(0)]
    for bad in (float("nan"), -0.5, float("inf")):
        probs = torch.full((1, 4), 0.25)
        probs[0, 1] = bad
        with pytest.raises(RuntimeError, match="probability tensor"):
            multinomial_rows(probs, gens)


def test_decode_cache_gives_the_same_logits_and_drops_rows(loaded):
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, len(loaded.tokenizer), (3, 5), generator=g)
    steps = torch.randint(6, len(loaded.tokenizer), (3, 4), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
        ours = model(input_ids=ids, use_cache=True, cache=decode_cache(model, 7))  # grows past its capacity
        torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=0)
        ref_cache, cache = ref.cache, ours.cache
        for t in range(steps.shape[1]):
            ref = model(input_ids=steps[:, t : t + 1], cache=ref_cache, use_cache=True)
            ours = model(input_ids=steps[:, t : t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-6, atol=1e-6)
        keep = torch.tensor([0, 2])
        ref_cache.batch_select_indices(keep)
        cache.batch_select_indices(keep)
        nxt = steps[keep, :1]
        ref = model(input_ids=nxt, cache=ref_cache, use_cache=True)
        ours = model(input_ids=nxt, cache=cache, use_cache=True)
        torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-6, atol=1e-6)


def _requests(n: int) -> list[TrialRequest]:
    g = torch.Generator().manual_seed(1)
    ivs = [
        None,
        Intervention(steer_latent=7, boost=3.0),
        Intervention(ablate=(1, 2, 3), capture=(5, 9)),
        Intervention(steer_latent=4, boost=2.0, capture=(3,)),
    ]
    out = []
    for i in range(n):
        k = int(torch.randint(1, 9, (1,), generator=g))
        prompt = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g))
        out.append(TrialRequest(prompt, 100 + i, ivs[i % len(ivs)]))
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_dropping_finished_rows_changes_no_result(loaded, directions, temperature):
    """Rows that hit EOS leave the batch early; every trial's tokens equal generating it alone (and equal the
    batch that keeps finished rows decoding pads), activations of every generated token included."""
    settings = GenerationSettings(temperature=temperature, repetition_penalty=1.1, max_new_tokens=10, batch_size=12)
    plan = SteeringPlan(LAYER, LAYER)
    requests = _requests(12)
    gen_cfg = loaded.model.generation_config
    old_eos = gen_cfg.eos_token_id
    # EOS ids taken from a first run at different steps, so that rows finish at many different steps
    probe = SteeredGenerator(
        loaded, directions, plan, dataclasses.replace(settings, ignore_eos=True), progress=False
    ).generate(requests)
    gen_cfg.eos_token_id = [loaded.tokenizer.eos_token_id] + [probe[i].token_ids[k] for i, k in enumerate((1, 3, 6))]
    try:
        dropped = SteeredGenerator(loaded, directions, plan, settings, progress=False).generate(requests)
        kept = SteeredGenerator(loaded, directions, plan, settings, progress=False, drop_finished=False).generate(
            requests
        )
        alone = [
            SteeredGenerator(loaded, directions, plan, settings, progress=False).generate([r])[0] for r in requests
        ]
    finally:
        gen_cfg.eos_token_id = old_eos
    reasons = {r.finish_reason for r in dropped}
    assert reasons == {"eos", "length"}, reasons  # the test needs early finishers and rows that run to the end
    assert len({r.n_tokens for r in dropped if r.finish_reason == "eos"}) > 1
    for a, b, c in zip(dropped, kept, alone):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.n_tokens == b.n_tokens == c.n_tokens == len(a.token_ids)
        assert a.finish_reason == b.finish_reason == c.finish_reason
        if a.intervention is not None and a.intervention.capture:
            assert a.activations.shape == (a.n_tokens, len(a.intervention.capture))
            torch.testing.assert_close(a.activations, b.activations, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.activations, c.activations, atol=1e-5, rtol=1e-5)
        else:
            assert a.activations is None and b.activations is None

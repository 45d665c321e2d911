"""Batched steered generation on tiny fp32 models: per-row independence, seeds, capture of every generated token,
EOS handling, chat templates, repetition penalty."""

from __future__ import annotations

import logging

import pytest
import torch

from esr.generation import (
    GenerationSettings,
    SteeredGenerator,
    TrialRequest,
    encode_prompt,
    penalise_history,
    reference_llama_suffix_ids,
    sample_rows,
)
from esr.models import wrap_model
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan
from esr.testing import tiny_gemma2, tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)

LAYER = 2
PROMPT_A = "how do you bake bread"


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def loaded(request):
    tok = tiny_tokenizer()
    model = (tiny_llama if request.param == "llama" else tiny_gemma2)(vocab_size=len(tok))
    return wrap_model(model, tok, dtype="float32", device="cpu")


@pytest.fixture(scope="module", params=["jumprelu", "standard"])
def directions(request):
    return SteeringDirections(tiny_sae(kind=request.param, layer=LAYER), "raw")


def make(loaded, directions, **settings) -> SteeredGenerator:
    kw = {"temperature": 0.0, "max_new_tokens": 10, "batch_size": 8} | settings
    return SteeredGenerator(loaded, directions, SteeringPlan(LAYER, LAYER), GenerationSettings(**kw), progress=False)


def mixed_batch(target: TrialRequest) -> list[TrialRequest]:
    return [
        TrialRequest(
            "explain how to make a car tire budget letter for the dog and the cat",
            11,
            Intervention(steer_latent=7, boost=6.0),
        ),
        target,
        TrialRequest("water", 12, Intervention(ablate=(1, 2, 3, 4, 5))),
        TrialRequest("the cat", 13, None),
    ]


def test_greedy_alone_equals_in_mixed_batch(loaded, directions):
    gen = make(loaded, directions)
    for iv in (None, Intervention(steer_latent=5, boost=4.0), Intervention(ablate=(2, 9), capture=(5,))):
        target = TrialRequest(PROMPT_A, 1, iv)
        alone = gen.generate([target])[0]
        batched = gen.generate(mixed_batch(target))[1]
        assert alone.token_ids == batched.token_ids
        assert alone.n_tokens == batched.n_tokens and alone.finish_reason == batched.finish_reason


def test_steering_changes_generation(loaded, directions):
    gen = make(loaded, directions)
    plain, steered = gen.generate([TrialRequest(PROMPT_A, 1), TrialRequest(PROMPT_A, 1, Intervention(5, 40.0))])
    assert plain.token_ids != steered.token_ids
    assert steered.steering["boost"] == 40.0 and steered.steering["boost_unit"] == "raw"


def test_sampling_is_reproducible_per_row(loaded, directions):
    gen = make(loaded, directions, temperature=0.6, repetition_penalty=1.1)
    target = TrialRequest(PROMPT_A, 1234, Intervention(steer_latent=5, boost=2.0))
    alone = gen.generate([target])[0]
    again = gen.generate([target])[0]
    batched = gen.generate(mixed_batch(target))[1]
    assert alone.token_ids == again.token_ids == batched.token_ids
    other_seed = gen.generate([TrialRequest(PROMPT_A, 99, target.intervention)])[0]
    assert other_seed.seed == 99
    assert alone.settings["temperature"] == 0.6 and alone.settings["repetition_penalty"] == 1.1


def test_capture_covers_every_generated_token_including_last(loaded, directions):
    gen = make(loaded, directions, max_new_tokens=6)
    capture = (5, 3)
    iv = Intervention(steer_latent=5, boost=3.0, capture=capture)
    res = gen.generate(mixed_batch(TrialRequest(PROMPT_A, 1, iv)))[1]
    assert res.activations.shape == (res.n_tokens, 2)
    # independent pass: the whole sequence at once, steering via a plain hook, SAE encode of layer-L output
    sae = directions.sae
    ids = torch.tensor([res.prompt_token_ids + res.token_ids])
    vec = 3.0 * sae.W_dec[5].detach()
    layer = loaded.model.model.layers[LAYER]
    seen: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: o + vec),
        layer.register_forward_hook(lambda m, a, o: seen.append(o)),
    ]
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    hs = seen[0]
    with torch.no_grad():
        expected = sae.encode(hs[0, len(res.prompt_token_ids) :])[:, list(capture)]
    torch.testing.assert_close(res.activations, expected, atol=1e-4, rtol=1e-4)
    assert res.activations[-1].abs().sum() >= 0  # the last token is present (shape checked above)


def test_eos_stops_rows_independently(loaded, directions):
    eos = loaded.tokenizer.eos_token_id
    # make the model emit EOS right away on one row by steering the logits with a huge penalty-free bias:
    # simplest is to ask for the row whose first greedy token we then declare to be EOS
    gen = make(loaded, directions, max_new_tokens=5)
    first = gen.generate([TrialRequest(PROMPT_A, 1)])[0].token_ids[0]
    loaded.model.generation_config.eos_token_id = [eos, first]
    try:
        res = gen.generate([TrialRequest(PROMPT_A, 1), TrialRequest("the dog and the cat", 2)])
    finally:
        loaded.model.generation_config.eos_token_id = eos
    assert res[0].finish_reason == "eos" and res[0].n_tokens == 1 and res[0].token_ids == [first]
    assert res[1].n_tokens == len(res[1].token_ids)
    if first not in res[1].token_ids:
        assert res[1].finish_reason == "length" and res[1].n_tokens == 5


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    history = torch.tensor([[0, 1, 1], [2, 2, 2]])  # repeats count once
    out = penalise_history(logits.clone(), history, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 0.5]]
    assert torch.equal(penalise_history(logits.clone(), history, 1.0), logits)


def test_sample_rows_uses_row_generators():
    logits = torch.randn(3, 50)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    a = sample_rows(logits[[0, 1, 0]], 1.0, gens)
    assert a[0] == a[2]
    assert sample_rows(logits, 0.0, gens).tolist() == logits.argmax(-1).tolist()


def test_encode_prompt_templates():
    tok = tiny_tokenizer()
    ids = encode_prompt(tok, PROMPT_A)
    assert tok.convert_ids_to_tokens(ids)[0] == "<bos>" and tok.convert_ids_to_tokens(ids)[-1] == "<assistant>"
    assert encode_prompt(tok, PROMPT_A, "none") != ids
    with pytest.raises(ValueError, match="Llama-3 tokenizer"):
        encode_prompt(tok, PROMPT_A, "reference_llama_prompt")
    with pytest.raises(ValueError, match="'chatml'"):
        encode_prompt(tok, PROMPT_A, "chatml")


def test_reference_llama_prompt_appends_extra_assistant_header():
    tok = tiny_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]}
    )
    tok.add_tokens(["assistant"])
    suffix = reference_llama_suffix_ids(tok)
    assert tok.convert_ids_to_tokens(suffix) == [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "assistant",
        "<|end_header_id|>",
    ]
    ids = encode_prompt(tok, PROMPT_A, "reference_llama_prompt")
    assert ids == encode_prompt(tok, PROMPT_A) + suffix


def test_results_are_records(loaded, directions):
    gen = make(loaded, directions, max_new_tokens=3)
    res = gen.generate(
        [TrialRequest(PROMPT_A, 5, Intervention(steer_latent=1, boost=1.0, capture=(1,)), trial_id="t0")]
    )[0]
    rec = res.to_record()
    assert rec["trial_id"] == "t0" and rec["intervention"]["steer_latent"] == 1 and "activations" not in rec
    assert rec["settings"]["injection_layer"] == LAYER and rec["settings"]["max_new_tokens"] == 3
    assert isinstance(res.response, str) and res.n_tokens == len(res.token_ids)


def test_generate_logs_progress_lines_with_rate_and_eta(loaded, directions, caplog):
    """Generation over several batches logs to the rule's log (logging), not a terminal bar (issue 16's material
    generation logged nothing for 5 min)."""
    gen = make(loaded, directions, max_new_tokens=2, batch_size=2)
    gen.progress = True
    reqs = [TrialRequest(PROMPT_A, s, None) for s in range(5)]
    with caplog.at_level(logging.INFO, logger="esr.generation"):
        gen.generate(reqs, desc="steered drift")
    lines = [m for m in caplog.messages if m.startswith("steered drift: ")]
    assert lines and lines[-1].startswith("steered drift: 5/5 sequences (100%)") and "ETA" in lines[-1]


def test_settings_validation():
    with pytest.raises(ValueError, match="temperature -1"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="'weird'"):
        GenerationSettings(chat_template="weird")


def test_repetition_penalty_ignores_padding(loaded, directions):
    gen = make(loaded, directions, repetition_penalty=2.0)
    target = TrialRequest("the dog <pad> and the cat", 3, Intervention(steer_latent=2, boost=1.0))
    assert 0 in encode_prompt(loaded.tokenizer, target.prompt)  # the pad id occurs inside the prompt
    assert gen.generate([target])[0].token_ids == gen.generate(mixed_batch(target))[1].token_ids

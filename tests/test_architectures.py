"""Every architecture family of the registry (``esr.config.MODEL_FAMILIES``) on tiny random fp32 models built from
transformers configs (offline): the decoder blocks are found generically, steering adds exactly boost * W_dec at the
chosen block's output through the real hook path, a batch equals each row alone, a saved model directory loads
without a configured family, and unsupported architectures fail naming their class."""

from __future__ import annotations

import pytest
import torch
from transformers import CONFIG_MAPPING

from esr.config import (
    FAMILY_OF_MODEL_TYPE,
    MODEL_FAMILIES,
    REPO_ROOT,
    ConfigError,
    ModelFamily,
    ModelSpec,
    SAESpec,
    family_from_hf_id,
    load_schema,
    validate_config,
)
from esr.fidelity import _family
from esr.generation import GenerationSettings, SteeredGenerator, TrialRequest
from esr.models import (
    FAMILIES,
    _find_block_list,
    check_family,
    decoder_layers,
    infer_family,
    load_model,
    load_model_dir,
    wrap_model,
)
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan, apply_interventions
from esr.testing import save_tiny_model_dir, tiny_causal_lm, tiny_sae, tiny_tokenizer

from helpers import forward_recording

torch.set_num_threads(1)

LAYER = 2
N_LAYERS = 4
#: (family, HF model_type) for every model type of every family that this transformers version has.
ARCHS = [(fam, mt) for fam, spec in MODEL_FAMILIES.items() for mt in spec.model_types if mt in CONFIG_MAPPING]
#: Where each architecture keeps its decoder blocks (independent of the generic search).
BLOCKS = {"gpt_neox": "gpt_neox.layers", "gemma3": "model.language_model.layers"}
IDS = torch.tensor([[0, 0, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18], [0, 0, 0, 1, 20, 21, 22, 23]])
MASK = (torch.arange(IDS.shape[1])[None, :] >= (IDS == 0).sum(1, keepdim=True)).long()


@pytest.fixture(scope="module", params=ARCHS, ids=[mt for _, mt in ARCHS])
def arch(request):
    family, model_type = request.param
    return family, model_type, tiny_causal_lm(model_type, vocab_size=128, n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def directions():
    return SteeringDirections(tiny_sae(d_in=64, kind="standard", layer=LAYER), "raw")


def run(model, ids, mask, record_layer: int = LAYER):
    return forward_recording(model, ids, mask, record_layer)


def test_every_family_exists_in_transformers():
    assert {fam for fam, _ in ARCHS} == set(MODEL_FAMILIES)  # a stale registry entry would be untested


def test_schema_family_enum_is_the_registry():
    enum = load_schema()["$defs"]["model"]["properties"]["family"]["enum"]
    assert sorted(enum) == sorted(MODEL_FAMILIES) and FAMILIES is MODEL_FAMILIES
    assert "family" not in load_schema()["$defs"]["model"]["required"]


def test_config_without_family_validates_and_qwen2_is_accepted():
    import yaml

    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    entry = next(iter(config["models"].values()))
    entry.pop("family")
    validate_config(config)
    assert ModelSpec.from_config("tiny", entry).family is None
    entry["family"] = "qwen2"
    validate_config(config)
    entry["family"] = "gpt2"
    with pytest.raises(ConfigError, match="family"):
        validate_config(config)


def test_infer_family_from_type_config_and_mapping():
    for fam, spec in MODEL_FAMILIES.items():
        for mt in spec.model_types:
            assert infer_family(mt) == fam and infer_family({"model_type": mt}) == fam
    assert infer_family(tiny_causal_lm("qwen2", n_layers=1).config) == "qwen2"
    with pytest.raises(ValueError, match="'bert'"):
        infer_family("bert")
    with pytest.raises(ValueError, match="no model_type"):
        infer_family({})
    assert len(FAMILY_OF_MODEL_TYPE) == sum(len(s.model_types) for s in MODEL_FAMILIES.values())  # no type twice


@pytest.mark.parametrize(
    ("hf_id", "family"),
    [
        ("meta-llama/Llama-3.3-70B-Instruct", "llama"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama"),
        ("HuggingFaceTB/SmolLM3-3B", "smollm3"),
        ("google/gemma-2-2b-it", "gemma2"),
        ("google/gemma-2-27b-it", "gemma2"),
        ("google/gemma-2b", "gemma"),
        ("google/gemma-7b-it", "gemma"),
        ("google/gemma-3-1b-it", "gemma3"),
        ("google/gemma-3-27b-it", "gemma3"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        ("Qwen/Qwen2-7B-Instruct", "qwen2"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
        ("microsoft/Phi-3.5-mini-instruct", "phi3"),
        ("microsoft/phi-4", "phi3"),
        ("allenai/OLMo-7B-hf", "olmo"),
        ("allenai/OLMo-2-1124-7B-Instruct", "olmo2"),
        ("allenai/Olmo-3-7B-Instruct", "olmo3"),
        ("EleutherAI/pythia-70m", "gpt_neox"),
        ("EleutherAI/gpt-neox-20b", "gpt_neox"),
        ("org/tiny", None),
        ("google-bert/bert-base-uncased", None),
        ("allenai/OLMoE-1B-7B-0924", None),
    ],
)
def test_family_from_hf_id(hf_id, family):
    assert family_from_hf_id(hf_id) == family
    assert _family({"models": {"m": {"hf_id": hf_id}}}, "m") == family  # the fidelity table's guess
    assert _family({"models": {"m": {"hf_id": hf_id, "family": "qwen2"}}}, "m") == "qwen2"


def test_decoder_layers_finds_the_blocks(arch):
    family, model_type, model = arch
    layers = decoder_layers(model)
    assert layers is model.get_submodule(BLOCKS.get(model_type, "model.layers"))
    assert len(layers) == N_LAYERS
    # block L's output is hidden_states[L+1] for every block but the last (HF's last entry is after the final norm)
    seen: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            pos = (MASK.cumsum(-1) - 1).clamp(min=0)
            hs = model(input_ids=IDS, attention_mask=MASK, position_ids=pos, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    assert len(hs) == N_LAYERS + 1 and len(seen) == N_LAYERS
    for layer in range(N_LAYERS - 1):
        assert torch.equal(seen[layer], hs[layer + 1]), f"{model_type}: block {layer} output != hidden_states"
    assert not torch.allclose(seen[-1], hs[-1])


def test_steering_adds_boost_times_w_dec_and_rows_are_independent(arch, directions):
    _, model_type, model = arch
    base_logits, base_h = run(model, IDS, MASK)
    latent, boost = 5, 4.0
    ivs = [Intervention(steer_latent=latent, boost=boost), None, Intervention(steer_latent=9, boost=-3.0)]
    with apply_interventions(model, ivs, directions, SteeringPlan(injection_layer=LAYER, sae_layer=LAYER)):
        logits, h = run(model, IDS, MASK)
    w_dec = directions.sae.W_dec.detach()
    torch.testing.assert_close(h[0] - base_h[0], (boost * w_dec[latent]).expand_as(h[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(h[2] - base_h[2], (-3.0 * w_dec[9]).expand_as(h[2]), atol=1e-5, rtol=0)
    assert torch.equal(h[1], base_h[1]) and torch.equal(logits[1], base_logits[1])
    assert not torch.allclose(logits[0, -1], base_logits[0, -1])
    # each row alone (no padding) gives what it gives in the batch
    for i, iv in enumerate(ivs):
        keep = MASK[i].bool()
        ids, mask = IDS[i, keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long)
        with apply_interventions(model, [iv], directions, SteeringPlan(injection_layer=LAYER, sae_layer=LAYER)):
            logits_i, h_i = run(model, ids, mask)
        torch.testing.assert_close(h_i[0], h[i, keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits_i[0, -1], logits[i, -1], atol=1e-4, rtol=1e-4)


def test_steered_generation_in_a_batch_equals_each_row_alone(arch, directions):
    _, _, model = arch
    loaded = wrap_model(model, tiny_tokenizer(), dtype="float32", device="cpu")
    settings = GenerationSettings(temperature=0.0, max_new_tokens=6, batch_size=8)
    gen = SteeredGenerator(loaded, directions, SteeringPlan(LAYER, LAYER), settings, progress=False)
    requests = [
        TrialRequest("how do you bake bread", 1, Intervention(steer_latent=5, boost=8.0, capture=(5,))),
        TrialRequest("explain how the car and the tire", 2, None),
        TrialRequest("the dog", 3, Intervention(ablate=(1, 2, 3))),
    ]
    batched = gen.generate(requests)
    for req, res in zip(requests, batched, strict=True):
        alone = gen.generate([req])[0]
        assert alone.token_ids == res.token_ids and len(res.token_ids) > 0
    assert batched[0].activations.shape == (batched[0].n_tokens, 1)
    plain = gen.generate([TrialRequest("how do you bake bread", 1, None)])[0]
    steered = gen.generate([TrialRequest("how do you bake bread", 1, Intervention(steer_latent=5, boost=80.0))])[0]
    assert plain.token_ids != steered.token_ids


def test_load_model_dir_infers_the_family(arch, tmp_path):
    family, model_type, model = arch
    tok = tiny_tokenizer()
    save_tiny_model_dir(model, tok, tmp_path / "m")
    lm = load_model_dir(tmp_path / "m", device="cpu")
    assert lm.family == family and lm.n_layers == N_LAYERS and lm.d_model == 64
    assert type(lm.model) is type(model)
    assert lm.model.config._attn_implementation == ("eager" if FAMILIES[family].eager_attention else "sdpa")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=IDS[1:2]).logits, model(input_ids=IDS[1:2]).logits)
    spec = ModelSpec(
        name="tiny",
        hf_id="org/tiny",
        source="local",
        revision="local",
        n_layers=N_LAYERS,
        n_params=1.0,
        dtype="float32",
        injection_layer=LAYER,
        sae_layer=LAYER,
        repetition_penalty=1.0,
        sae=SAESpec(source="local", boost_unit="raw", path="unused"),
        boost={"prior_mean": 1.0, "prior_std": 1.0, "lower": 0.0, "upper": 2.0},
        path=str(tmp_path / "m"),
    )
    assert spec.family is None and load_model(spec, device="cpu").family == family
    other = "llama" if family != "llama" else "qwen2"
    with pytest.raises(ValueError, match=rf"'{other}'.*'{model_type}'"):
        load_model_dir(tmp_path / "m", device="cpu", family=other)


def test_eager_attention_for_registry_families_and_soft_capped_configs(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    capped = tiny_causal_lm("gemma3_text")
    capped.config.attn_logit_softcapping = 50.0  # an architecture whose soft-capping is a config choice
    save_tiny_model_dir(capped, tok, tmp_path / "capped")
    assert load_model_dir(tmp_path / "capped", device="cpu").model.config._attn_implementation == "eager"
    save_tiny_model_dir(tiny_causal_lm("llama"), tok, tmp_path / "llama")
    assert load_model_dir(tmp_path / "llama", device="cpu").model.config._attn_implementation == "sdpa"
    monkeypatch.setitem(FAMILIES, "llama", ModelFamily(("llama",), "llama", eager_attention=True))
    assert load_model_dir(tmp_path / "llama", device="cpu").model.config._attn_implementation == "eager"


def test_check_family():
    assert check_family(family=None, model_type="qwen2") == "qwen2"
    assert check_family(family=None, model_type="gpt2") is None  # outside the registry: loaded generically
    assert check_family(family="gemma3", model_type="gemma3_text") == "gemma3"
    with pytest.raises(ValueError, match="'gemma2'.*'gemma3_text'"):
        check_family(family="gemma2", model_type="gemma3_text")
    with pytest.raises(ValueError, match="'gpt2' is not one of"):
        check_family(family="gpt2", model_type="gpt2")


def test_architecture_outside_the_registry_loads_generically(tmp_path):
    gpt2 = tiny_causal_lm("gpt2", n_layers=N_LAYERS)
    assert decoder_layers(gpt2) is gpt2.transformer.h
    save_tiny_model_dir(gpt2, tiny_tokenizer(), tmp_path / "g")
    lm = load_model_dir(tmp_path / "g", device="cpu")
    assert lm.family is None and lm.n_layers == N_LAYERS and lm.d_model == 64


def test_unsupported_architectures_name_the_class():
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(TypeError, match="BertModel is not a causal LM"):
        decoder_layers(bert)
    with pytest.raises(TypeError, match="BertModel"):
        wrap_model(bert, tiny_tokenizer(), device="cpu")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration is an encoder-decoder"):
        decoder_layers(t5)
    with pytest.raises(TypeError, match="Linear is not a Hugging Face"):
        decoder_layers(torch.nn.Linear(2, 2))
    llama = tiny_causal_lm("llama", n_layers=2)
    llama.model.layers = torch.nn.Sequential(*llama.model.layers)  # no block list any more
    with pytest.raises(TypeError, match=r"LlamaForCausalLM: found no decoder blocks.*num_hidden_layers = 2"):
        decoder_layers(llama)


def test_ambiguous_block_lists_are_rejected():
    model = tiny_causal_lm("gemma3", n_layers=N_LAYERS)  # its vision tower also has 4 layers
    assert decoder_layers(model) is model.model.language_model.layers  # get_decoder() picks the language model
    # the fallback search over the whole wrapper prefers the shallowest list (vision_tower.encoder.layers is deeper)
    assert _find_block_list(model, N_LAYERS) is model.model.language_model.layers
    llama = tiny_causal_lm("llama", n_layers=2)
    llama.model.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="ambiguous.*layers, extra"):
        decoder_layers(llama)

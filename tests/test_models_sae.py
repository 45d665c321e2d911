"""Model loading from a local HF directory and SAE loading / boost units (tiny models, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from esr.config import ModelSpec, SAESpec
from esr.models import decoder_layers, load_model, load_model_dir, prepare_tokenizer, resolve_dtype
from esr.sae import STATS_FILE, SteeringDirections, load_sae, read_median_resid_norm, steering_directions
from esr.testing import save_tiny_model_dir, tiny_gemma2, tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)


def spec(
    name: str = "tiny", family: str = "llama", path: str | None = None, sae: SAESpec | None = None, **kw
) -> ModelSpec:
    fields = dict(
        hf_id="org/tiny",
        source="local",
        revision="local",
        family=family,
        n_layers=4,
        n_params=1.0,
        dtype="float32",
        injection_layer=2,
        sae_layer=2,
        repetition_penalty=1.1,
        sae=sae or SAESpec(source="local", boost_unit="raw", path="unused"),
        boost={"prior_mean": 1.0, "prior_std": 1.0, "lower": 0.0, "upper": 2.0},
        path=path,
    )
    fields.update(kw)
    return ModelSpec(name=name, **fields)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_load_model_dir_roundtrip(tmp_path, family):
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    model = (tiny_llama if family == "llama" else tiny_gemma2)(vocab_size=len(tok))
    save_tiny_model_dir(model, tok, tmp_path / "m")
    lm = load_model(spec(family=family, path=str(tmp_path / "m")), device="cpu")
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id is not None
    assert lm.dtype == torch.float32 and not lm.model.training and lm.n_layers == 4 and lm.d_model == 64
    assert lm.engine == "transformers" and lm.device == torch.device("cpu")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    if family == "gemma2":
        assert lm.model.config._attn_implementation == "eager"
    assert tok.eos_token_id in lm.eos_token_ids()


def test_load_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="'gpt2'"):
        load_model(spec(family="gpt2", path=str(tmp_path)))


def test_prepare_tokenizer_sets_pad_from_eos():
    tok = tiny_tokenizer()
    tok.pad_token = None
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_decoder_layers_rejects_unknown_models():
    with pytest.raises(TypeError, match="Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["jumprelu", "standard"])
def test_load_sae_from_disk(tmp_path, kind):
    sae = tiny_sae(kind=kind)
    sae.save_model(str(tmp_path / "sae"))
    loaded = load_sae(SAESpec(source="local", boost_unit="raw", path=str(tmp_path / "sae")))
    assert torch.equal(loaded.W_dec, sae.W_dec) and type(loaded).__name__ == type(sae).__name__
    with pytest.raises(FileNotFoundError, match="missing"):
        load_sae(SAESpec(source="embedded", boost_unit="raw", path=str(tmp_path / "missing")))


def test_load_sae_from_pretrained_goes_through_sae_lens(monkeypatch):
    import sae_lens

    calls = []
    monkeypatch.setattr(
        sae_lens.SAE,
        "from_pretrained",
        classmethod(lambda cls, release, sae_id, **kw: calls.append((release, sae_id)) or tiny_sae()),
    )
    load_sae(
        SAESpec(
            source="sae_lens",
            boost_unit="raw",
            release="gemma-scope-2b-pt-res-canonical",
            sae_id="layer_16/width_16k/canonical",
        )
    )
    assert calls == [("gemma-scope-2b-pt-res-canonical", "layer_16/width_16k/canonical")]


def test_boost_units():
    sae = tiny_sae(kind="standard")  # decoder rows not unit norm
    j = 3
    row = sae.W_dec[j].detach()
    raw = SteeringDirections(sae, "raw")
    torch.testing.assert_close(raw.vector(j, 2.0), 2.0 * row)
    assert raw.residual_norm(j, 2.0) == pytest.approx(2.0 * float(row.norm()), rel=1e-5)
    med = SteeringDirections(sae, "median_resid_norm", median_resid_norm=10.0)
    torch.testing.assert_close(med.vector(j, 0.5), 0.5 * 10.0 * row / row.norm())
    assert med.residual_norm(j, 0.5) == pytest.approx(5.0, rel=1e-5)
    d = med.describe(j, 0.5)
    assert d["boost_unit"] == "median_resid_norm" and d["steer_residual_norm"] == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(ValueError, match="median_resid_norm"):
        SteeringDirections(sae, "median_resid_norm")
    with pytest.raises(ValueError, match="'furlongs'"):
        SteeringDirections(sae, "furlongs")
    with pytest.raises(ValueError, match="latent 999"):
        raw.vector(999, 1.0)


def test_median_norm_from_stats_file(tmp_path):
    (tmp_path / STATS_FILE).write_text(json.dumps({"median_resid_norm": 171.7}))
    assert read_median_resid_norm(tmp_path) == 171.7
    s = spec(sae=SAESpec(source="embedded", boost_unit="median_resid_norm", path=str(tmp_path)))
    d = steering_directions(s, tiny_sae())
    assert d.median_resid_norm == 171.7
    assert steering_directions(s, tiny_sae(), median_resid_norm=3.0).median_resid_norm == 3.0
    with pytest.raises(FileNotFoundError, match="esr_stats.json"):
        read_median_resid_norm(tmp_path / "nope")
    (tmp_path / STATS_FILE).write_text(json.dumps({"other": 1}))
    with pytest.raises(KeyError, match="median_resid_norm"):
        read_median_resid_norm(tmp_path)

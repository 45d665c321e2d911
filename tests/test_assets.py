import hashlib
import json

import pytest

from esr.assets import (
    MANIFEST,
    AssetError,
    download_hub_model,
    embedded_gguf_path,
    fetch_prompts,
    read_prompts,
    verify_manifest,
)
from esr.config import ModelSpec, SAESpec
from esr.testing import save_tiny_model_dir, tiny_llama, tiny_tokenizer

PAPER_PROMPTS_SHA = "a3bcbf82a44046c3fdcb9b65c58b1254ee8976401214533a5a550f0aa00a55d3"


def _spec(hf_id="fake-org/tiny-llama", revision="0" * 40):
    return ModelSpec(
        name="tiny",
        hf_id=hf_id,
        source="hub",
        revision=revision,
        family="llama",
        n_layers=4,
        n_params=1e6,
        dtype="float32",
        injection_layer=2,
        sae_layer=2,
        repetition_penalty=1.1,
        sae=SAESpec(source="local", boost_unit="raw", path="x"),
        boost={},
    )


def test_prompt_download_from_file_url_checks_hash(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("Explain how to bake bread.\n\nHow do you tie a knot?\n")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    out = fetch_prompts("url", "unused", tmp_path / "out/prompts.txt", url=src.as_uri(), sha256=sha)
    assert read_prompts(out) == ["Explain how to bake bread.", "How do you tie a knot?"]


def test_prompt_hash_mismatch_is_a_clear_error_and_writes_nothing(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("tampered\n")
    out = tmp_path / "out/prompts.txt"
    with pytest.raises(AssetError, match=PAPER_PROMPTS_SHA):
        fetch_prompts("url", "unused", out, url=src.as_uri(), sha256=PAPER_PROMPTS_SHA)
    assert not out.exists()
    assert not list(out.parent.iterdir())  # no temporary left behind


def test_unreachable_prompt_url_names_the_url(tmp_path):
    with pytest.raises(AssetError, match="does-not-exist"):
        fetch_prompts(
            "url", "unused", tmp_path / "p.txt", url=(tmp_path / "does-not-exist").as_uri(), sha256=PAPER_PROMPTS_SHA
        )


def test_embedded_prompt_list_has_30_questions(repo_root):
    prompts = read_prompts(repo_root / "config/prompts/embedded_prompts.txt")
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)
    assert all(p.lower().startswith(("explain how", "how do you")) for p in prompts)


def _fake_hub_cache(root, hf_id, revision):
    snap = root / f"models--{hf_id.replace('/', '--')}" / "snapshots" / revision
    save_tiny_model_dir(tiny_llama(), tiny_tokenizer(), snap)
    (root / f"models--{hf_id.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{hf_id.replace('/', '--')}" / "refs" / "main").write_text(revision)
    return snap


def test_hub_download_offline_from_cache_writes_verifiable_manifest(tmp_path, monkeypatch):
    rev = "1234567890abcdef1234567890abcdef12345678"
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "fake-org/tiny-llama", rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_should_not_leak")
    out = download_hub_model(_spec(revision=rev), tmp_path / "models/tiny", cache_dir=cache)
    manifest = verify_manifest(out)
    assert manifest["revision"] == rev
    assert "model.safetensors" in manifest["files"]
    assert "hf_SECRET" not in (out / MANIFEST).read_text()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_hub_download_of_uncached_revision_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetError, match="fake-org/absent"):
        download_hub_model(_spec(hf_id="fake-org/absent", revision="a" * 40), tmp_path / "m", cache_dir=tmp_path)


def test_manifest_detects_tampering(tmp_path, monkeypatch):
    rev = "abcdef1234567890abcdef1234567890abcdef12"
    _fake_hub_cache(tmp_path / "hub", "fake-org/tiny-llama", rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = download_hub_model(_spec(revision=rev), tmp_path / "m", cache_dir=tmp_path / "hub")
    (out / "config.json").write_text(json.dumps({"tampered": True}))
    with pytest.raises(AssetError, match="config.json"):
        verify_manifest(out)


def test_smollm2_gguf_ships_in_the_installed_package():
    path = embedded_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 90_000_000

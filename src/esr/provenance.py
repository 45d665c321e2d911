"""The provenance block attached to every result: config, seeds, model/SAE/judge ids, package versions, git commit.

Secrets never enter provenance: environment variables are not recorded, and config values whose key looks like a
secret are redacted (a defence in depth; the config should never hold secrets in the first place)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = (
    "esr",
    "torch",
    "transformers",
    "sae-lens",
    "deepspeed",
    "snakemake",
    "xarray",
    "zarr",
    "scipy",
    "numpy",
    "statsmodels",
    "sentence-transformers",
    "gguf",
    "huggingface-hub",
)
_SECRET_KEY = re.compile(r"(token|secret|api[_-]?key|password|authorization)", re.IGNORECASE)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: str | Path | None = None) -> dict[str, Any]:
    """Commit of the checkout that runs the code, and whether it had uncommitted changes."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def redact(obj: Any) -> Any:
    """Copy of a config-like structure with secret-looking keys replaced by '<redacted>'."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def provenance(config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Build the provenance block. ``extra`` carries stage-specific ids (model, sae, judge, seeds, ...)."""
    from esr.io import stable_hash

    block: dict[str, Any] = {
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
    }
    if config is not None:
        clean = redact(config)
        block["config"] = clean
        block["config_sha256"] = stable_hash(clean)
    block.update(redact(extra))
    return block

"""Checks of a run's input files, made when the workflow is loaded, before any job runs.

A config can be schema-valid and still point at a missing prompts file, a label CSV without a latent column, or a
truncated SAE. Found only inside a job, such an input makes Snakemake start the upstream rules, which fail, and
delete their finished outputs; a truncated safetensors file failed only after the model had loaded, naming no file.
:func:`check_inputs` reads what can be read cheaply (file existence, sha256 of small files, CSV headers and latent
columns, safetensors headers against file sizes) and raises one :class:`InputError` listing every problem with the
config key and the file, so a bad edit stops the run with nothing started, rerun or deleted.

Called by ``workflow/rules/common.smk`` in the main Snakemake process (not in job processes, which would see the
outputs of running jobs half written). What cannot be checked offline (a URL's content) is checked by the rule that
fetches it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esr.config import ConfigError

#: sae-lens on-disk layout (``SAE.save_model``): the config and the weights file of an SAE folder.
SAE_FILES = ("cfg.json", "sae_weights.safetensors")


class InputError(ConfigError):
    """One or more configured input files are missing or unreadable; the message lists each key and file."""


def safetensors_problem(path: str | Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be complete (missing, bad header, shorter than its header says),
    or None. Reads only the 8-byte header length and the JSON header (format: huggingface/safetensors README)."""
    path = Path(path)
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes; no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path} is truncated (header of {n} bytes in a {size}-byte file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"{path} has an unreadable safetensors header ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path} is truncated ({size} bytes, its header needs {need})"
    return None


def _check_sae_dir(path: Path, key: str, problems: list[str], *, hint: str = "") -> None:
    if not path.is_dir():
        problems.append(f"{key}: SAE folder {path} does not exist{hint}")
        return
    for name in SAE_FILES:
        if not (path / name).is_file():
            problems.append(f"{key}: SAE folder {path} has no {name}{hint}")
    weights = path / SAE_FILES[1]
    if weights.is_file() and (why := safetensors_problem(weights)):
        problems.append(f"{key}: {why}{hint}")
    cfg = path / SAE_FILES[0]
    if cfg.is_file():
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            problems.append(f"{key}: {cfg} is not readable JSON ({err}){hint}")


def _check_model_dir(path: Path, key: str, problems: list[str], *, hint: str = "") -> None:
    if not path.is_dir():
        problems.append(f"{key}: model folder {path} does not exist{hint}")
        return
    if not (path / "config.json").is_file():
        problems.append(f"{key}: model folder {path} has no config.json{hint}")
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not sorted(path.glob("*.bin")):
        problems.append(f"{key}: model folder {path} holds no weights (*.safetensors or *.bin){hint}")
    for shard in shards:
        if why := safetensors_problem(shard):
            problems.append(f"{key}: {why}{hint}")


def _check_prompts(prompts: Mapping[str, Any], root: Path, problems: list[str]) -> None:
    from esr.io import sha256_file

    if prompts.get("source") != "file":
        return  # a URL is checked against prompts.sha256 by rule fetch_prompts
    path = root / prompts["path"]
    if not path.is_file():
        problems.append(f"prompts.path: prompts file {path} does not exist")
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if not any(line.strip() for line in text.splitlines()):
        problems.append(f"prompts.path: prompts file {path} holds no prompts")
    want = prompts.get("sha256")
    if want and (got := sha256_file(path)) != want:
        problems.append(f"prompts.sha256: prompts file {path} has sha256 {got}, the config says {want}")


def _check_labels(name: str, labels: Mapping[str, Any], root: Path, problems: list[str]) -> None:
    import pandas as pd

    from esr.io import sha256_file
    from esr.labels import LabelsError, check_label_columns

    key = f"models.{name}.labels"
    local = label_file(labels)
    if local is None:
        return
    path = root / local
    if not path.is_file():
        problems.append(f"{key}: labels file {path} does not exist")
        return
    want = labels.get("sha256")
    if want and (got := sha256_file(path)) != want:
        problems.append(f"{key}.sha256: labels file {path} has sha256 {got}, the config says {want}")
    try:
        check_label_columns(pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[]), str(path))
    except LabelsError as err:
        problems.append(f"{key}: {err}")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        problems.append(f"{key}: labels file {path} is not a readable CSV ({err})")


def label_file(labels: Mapping[str, Any]) -> str | None:
    """The local label CSV a ``models.<m>.labels`` block reads (``path``, or a ``file://`` url), else None."""
    if labels.get("source") not in ("goodfire", "file"):
        return None
    url = labels.get("url") or ""
    if url.startswith("file://"):
        return url.removeprefix("file://")
    if url:
        return None
    return labels.get("path")


def local_inputs(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Files outside the workflow's outputs that rules read, by role: ``prompts`` (source file) and
    ``labels:<model>``; the rules list them as inputs so that an edit in place reruns what depends on them."""
    out: dict[str, list[str]] = {"prompts": []}
    if config["prompts"].get("source") == "file":
        out["prompts"].append(config["prompts"]["path"])
    for name, m in config["models"].items():
        f = label_file(m.get("labels") or {})
        out[f"labels:{name}"] = [f] if f else []
    return out


def check_inputs(config: Mapping[str, Any], *, root: str | Path = ".") -> None:
    """Check every configured input file of a validated config; raise :class:`InputError` listing each problem.

    Checked: the prompts file (exists, non-empty, ``prompts.sha256``); each local label CSV (exists, sha256, a latent
    and a label column, integer latents); each local SAE folder (``cfg.json`` and complete safetensors weights);
    each local model folder (``config.json``, weights, complete safetensors); and the already-built model and SAE
    folders under ``resources/`` (a truncated file there names the folder to delete). Paths are relative to
    ``root`` (the workflow's working directory)."""
    root = Path(root)
    if (root / "bundle/manifest.json").is_file():
        return  # an imported results bundle (esr.bundle): no inputs or weights shipped; its files were verified
    problems: list[str] = []
    _check_prompts(config["prompts"], root, problems)
    for name, m in config["models"].items():
        where = f"models.{name}"
        _check_labels(name, m.get("labels") or {}, root, problems)
        sae = m["sae"]
        if sae["source"] == "local":
            _check_sae_dir(root / sae["path"], f"{where}.sae.path", problems)
        elif sae["source"] == "embedded" and (root / sae["path"]).exists():
            hint = f" (built by rule train_sae: delete {sae['path']} to rebuild it)"
            _check_sae_dir(root / sae["path"], f"{where}.sae", problems, hint=hint)
        if m["source"] == "local":
            _check_model_dir(root / m["path"], f"{where}.path", problems)
        elif (root / "resources/models" / name).exists():
            hint = f" (made by rule download_model: delete resources/models/{name} to fetch it again)"
            _check_model_dir(root / "resources/models" / name, where, problems, hint=hint)
    if problems:
        raise InputError("bad input files:\n  - " + "\n  - ".join(problems))

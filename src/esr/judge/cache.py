"""Content-addressed judge cache: one JSON file per key, written atomically.

The key is ``esr.io.stable_hash`` of (backend, model, template version, sampling params, prompt, response, label),
computed by the judge. Each entry lives at ``<cache_dir>/<key[:2]>/<key>.json`` and is written through
``esr.io.write_json`` (temp file + rename), so concurrent writers (several Snakemake jobs, several threads) never see
a torn file, and a crash leaves either the complete entry or none. Entries hold the result and the inputs that made
the key (for audit); they never hold credentials (judges never pass them in)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esr.io import write_json

CACHE_FORMAT = 1


@dataclass
class CacheCounts:
    """Hit/miss counts of one cache object (this process only)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0


class JudgeCache:
    """A directory of per-key JSON files. ``get`` returns the stored result dict or None; ``put`` stores one."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.counts = CacheCounts()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path_for(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            self.counts.misses += 1
            return None
        except (OSError, json.JSONDecodeError):  # should not happen with atomic writes; treat as a miss
            self.counts.corrupt += 1
            self.counts.misses += 1
            return None
        if entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        return entry["result"]

    def put(self, key: str, result: dict[str, Any], inputs: dict[str, Any] | None = None) -> Path:
        self.counts.writes += 1
        return write_json(
            self.path_for(key),
            {"format": CACHE_FORMAT, "key": key, "result": result, "inputs": inputs or {}},
            indent=None,
        )

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))

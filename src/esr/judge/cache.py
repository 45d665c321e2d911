"""Content-addressed judge cache: one JSON file per key, written atomically, checksummed, validated on read.

The key is ``esr.io.stable_hash`` of (backend, model, template version, sampling params, prompt, response, label),
computed by the judge. Each entry lives at ``<cache_dir>/<key[:2]>/<key>.json`` and is written through
``esr.io.write_json`` (a temporary file in the same folder, then ``os.replace``), so concurrent writers (several
Snakemake or SLURM jobs sharing one cache directory, several threads) never see a torn file, and a crash leaves
either the complete entry or none; two writers of one key leave one complete entry (the last).

An entry holds either a *result* (a verdict, or a ``parse``/``truncated`` error) or a *failure* (a request that
failed permanently after the transport's retries: error kind, HTTP status, message, time), plus the inputs that made
the key (for audit) and a SHA-256 ``checksum`` over everything else. An entry that is truncated, edited (checksum
mismatch), of another format or filed under another key is never returned: it is logged as a WARNING naming the
file, counted in ``counts.corrupt`` and treated as a miss, so the request is graded again and the entry
overwritten. Entries never hold credentials (judges never pass them in)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esr.io import _json_default, stable_hash, write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: checksummed entries, result or failure (1 had no checksum; its keys are no longer made)


@dataclass
class CacheCounts:
    """Counts of one cache object (this process only): hits, misses, writes, failure entries written, and
    entries found corrupt (unreadable, checksum mismatch, wrong format or key)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    failure_writes: int = 0
    corrupt: int = 0


def entry_checksum(entry: dict[str, Any]) -> str:
    """SHA-256 hex of an entry's JSON form, its ``checksum`` field left out (values are normalised through a JSON
    round trip first, so what is written and what is read back hash alike)."""
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return stable_hash(json.loads(json.dumps(body, default=_json_default)))


class JudgeCache:
    """A directory of per-key JSON files. ``get`` returns a stored result dict or None, ``get_failure`` a stored
    failure dict or None; ``put`` / ``put_failure`` store one. A result overwrites a failure of the same key; a
    failure never overwrites a result."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.counts = CacheCounts()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _read(self, key: str) -> dict[str, Any] | None:
        """The validated entry of ``key``, or None (missing, or corrupt: logged and counted)."""
        path = self.path_for(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._corrupt(path, f"unreadable ({type(exc).__name__}: {exc})")
        if not isinstance(entry, dict):
            return self._corrupt(path, "not a JSON object")
        if entry.get("format") != CACHE_FORMAT:
            return self._corrupt(path, f"format {entry.get('format')!r}, expected {CACHE_FORMAT}")
        if entry.get("key") != key:
            return self._corrupt(path, f"holds key {str(entry.get('key'))[:16]}..., not {key[:16]}...")
        if entry.get("checksum") != entry_checksum(entry):
            return self._corrupt(path, "checksum mismatch (the entry was edited or damaged)")
        if entry.get("kind") not in ("result", "failure") or not isinstance(entry.get(entry["kind"]), dict):
            return self._corrupt(path, f"no {entry.get('kind')!r} payload")
        return entry

    def _corrupt(self, path: Path, why: str) -> None:
        self.counts.corrupt += 1
        log.warning("judge cache entry %s is %s; ignoring it, the request is graded again", path, why)
        return None

    def lookup(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """``("result", result dict)``, ``("failure", failure dict)`` or None, reading the file once; a result counts
        as a hit, anything else as a miss."""
        entry = self._read(key)
        if entry is None or entry["kind"] != "result":
            self.counts.misses += 1
        else:
            self.counts.hits += 1
        return None if entry is None else (entry["kind"], entry[entry["kind"]])

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of ``key`` (a ``JudgeResult.to_dict``-style dict), or None (also for failures)."""
        found = self.lookup(key)
        return found[1] if found is not None and found[0] == "result" else None

    def get_failure(self, key: str) -> dict[str, Any] | None:
        """The stored failure of ``key`` (``error_kind``, ``status``, ``error``, ``failed_utc``, ...), or None."""
        entry = self._read(key)
        return entry["failure"] if entry is not None and entry["kind"] == "failure" else None

    def _write(self, key: str, kind: str, payload: dict[str, Any], inputs: dict[str, Any] | None) -> Path:
        entry = {"format": CACHE_FORMAT, "key": key, "kind": kind, kind: payload, "inputs": inputs or {}}
        entry["checksum"] = entry_checksum(entry)
        return write_json(self.path_for(key), entry, indent=None)

    def put(self, key: str, result: dict[str, Any], inputs: dict[str, Any] | None = None) -> Path:
        """Store a result (replacing a failure entry of the same key)."""
        self.counts.writes += 1
        return self._write(key, "result", result, inputs)

    def put_failure(self, key: str, failure: dict[str, Any], inputs: dict[str, Any] | None = None) -> Path | None:
        """Store a permanent failure, unless a valid result for ``key`` is already stored (another job may have
        graded it meanwhile); returns the path written or None."""
        current = self._read(key)
        if current is not None and current["kind"] == "result":
            return None
        self.counts.failure_writes += 1
        return self._write(key, "failure", failure, inputs)

    def __contains__(self, key: str) -> bool:
        """Whether a valid *result* is stored for ``key`` (counts nothing)."""
        entry = self._read(key)
        return entry is not None and entry["kind"] == "result"

    def __len__(self) -> int:
        """Number of entry files (results and failures)."""
        return sum(1 for _ in self.root.glob("*/*.json"))

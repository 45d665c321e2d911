"""Atomic, crash-safe file output. Every result file in the package is written through these helpers so that an
interrupted job never leaves a half-written file that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` (atomic on POSIX).

    Works for files and directories (e.g. a Zarr store or a safetensors folder). On error the temporary is removed
    and ``path`` is left untouched."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            backup = path.with_name(f".{path.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            path.rename(backup)
            tmp.rename(path)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_parquet(path: str | os.PathLike, df) -> Path:  # df: pandas.DataFrame
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def _json_default(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding: the content address used by caches (judge, calibration)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


SEED_HIGH = 2**31 - 1


def derive_seed(*parts: Any) -> int:
    """A seed in ``[0, 2**31 - 1)`` from a stable hash of ``parts`` (e.g. ``(seed, model, purpose)``): every random
    choice in the package is derived this way from the config seed, so nothing depends on global RNG state."""
    return int(stable_hash(list(parts))[:16], 16) % SEED_HIGH

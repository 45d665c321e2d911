"""Atomic, crash-safe file output. Every result file in the package is written through these helpers so that an
interrupted job never leaves a half-written file that looks complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

#: errno values of a write that failed for lack of room or a broken target (reported naming the final path).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})

#: The name of a temporary made by :func:`atomic_path` for ``<name>``: ``.<name>.<8 random chars>.tmp``
#: (``tempfile.mkstemp``), and of the backup of a replaced directory: ``.<name>.old``.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
BACKUP_NAME = re.compile(r"^\.(?P<name>.+)\.old$")


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.<name>.<random>.tmp``, :data:`TEMP_NAME`); on success it is
    renamed onto ``path`` (atomic on POSIX).

    Works for files and directories (e.g. a Zarr store or a safetensors folder). On error the temporary is removed
    and ``path`` is left untouched. A write that fails for lack of room or a broken target (``ENOSPC``, ``EDQUOT``,
    ``EFBIG``, ``EROFS``, ``EIO``: :data:`WRITE_ERRNOS`) is re-raised as an ``OSError`` of the same errno whose
    message names ``path`` and says it was left as it was; any other error gets a note naming ``path``. A kill
    leaves the temporary behind: :func:`remove_stale_temporaries` removes it on the next run."""
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
            try:
                tmp.rename(path)
            except BaseException:
                backup.rename(path)  # the previous output stays in place
                raise
            shutil.rmtree(backup)
        else:
            os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        if err.errno in WRITE_ERRNOS:
            raise OSError(
                err.errno,
                f"cannot write {path}: {err.strerror or err} (the previous {path.name}, if any, is unchanged; "
                f"temporary {tmp.name} removed)",
                str(path),
            ) from err
        err.add_note(f"while writing {path} (temporary {tmp.name} removed; {path.name} unchanged)")
        raise
    except BaseException:
        _remove(tmp)
        raise


def remove_stale_temporaries(
    roots: Iterable[str | os.PathLike], *, older_than: float, dry_run: bool = False
) -> list[Path]:
    """Remove what killed writes left under ``roots`` (folders; missing ones are skipped): temporaries of
    :func:`atomic_path` (:data:`TEMP_NAME`, files or folders such as ``.acts-1.zarr.k2j4x9ab.tmp``) and backups of
    a replaced directory (:data:`BACKUP_NAME`) whose target exists again, when last modified before ``older_than``
    (a POSIX timestamp: the start of this run's lock, so a temporary a running job is writing now is never
    touched). A backup whose target is missing (killed between the two renames) is renamed back onto its target.
    Generation checkpoints (``<trials>.partial``) are resume state, not temporaries: kept. Returns the paths
    removed or restored (``dry_run``: would be), sorted."""
    acted: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            for name in [*dirnames, *filenames]:
                p = here / name
                try:
                    mtime = p.lstat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime >= older_than:
                    continue
                if TEMP_NAME.match(name):
                    acted.append(p)
                    if not dry_run:
                        _remove(p)
                elif (m := BACKUP_NAME.match(name)) and p.is_dir():
                    target = here / m.group("name")
                    acted.append(p)
                    if not dry_run:
                        if target.exists():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.rename(target)
            dirnames[:] = [d for d in dirnames if (here / d).is_dir()]  # not into what was just removed
    return sorted(acted)


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

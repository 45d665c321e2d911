"""Clean up after a killed run (kill -9, pre-emption, a dead node): the ``onstart`` hook of the Snakefile.

A killed job leaves the temporaries of its atomic writes (``esr.io.atomic_path``: ``.<name>.<random>.tmp`` files and
folders, e.g. ``.acts-1.zarr.k2j4x9ab.tmp``; a ``.<name>.old`` backup when killed between the two renames of a
folder replace). Nothing reads them, but they would stay forever. When the next run starts (after
``snakemake --unlock``, see the README's "After a crash"), :func:`clean_after_kill` removes them, but only when it is
safe: this run holds the lock files of ``.snakemake/locks`` and no other Snakemake holds any there, and only what
was last modified before this run took its lock. Generation checkpoints (``<trials>.partial/``) are resume state
and are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from esr.io import remove_stale_temporaries

#: Folders (relative to the working directory) searched for temporaries, besides every configured ``cache_dir``.
OUTPUT_ROOTS = ("results", "resources", "logs")


def cache_dirs(config: Mapping[str, Any]) -> list[str]:
    """Every ``cache_dir`` value anywhere in ``config`` (judge blocks, cross-judge judges, ...), deduplicated."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k == "cache_dir" and isinstance(v, str) and v not in found:
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


def clean_after_kill(
    *,
    workdir: str | os.PathLike,
    own_locks: Iterable[str | os.PathLike] | None,
    extra_roots: Iterable[str | os.PathLike] = (),
    report: Callable[[str], None] = print,
) -> list[Path]:
    """Remove the temporaries killed jobs left under ``workdir``'s ``results/``, ``resources/``, ``logs/`` and
    ``extra_roots`` (relative to ``workdir`` unless absolute; e.g. the judge cache), via
    ``esr.io.remove_stale_temporaries`` with ``older_than`` = the oldest of ``own_locks`` (this run's lock files,
    ``.snakemake/locks/<n>.{input,output}.lock``). Does nothing, and says why through ``report``, when
    ``own_locks`` is empty or None (``--nolock``, or a persistence backend without lock files) or when any other
    lock file is present (another Snakemake runs here; its jobs' temporaries are live). Returns what was removed
    (or restored, for a folder backup whose target was missing)."""
    workdir = Path(workdir)
    mine = {Path(p).resolve() for p in (own_locks or ())}
    mine = {p for p in mine if p.exists()}
    if not mine:
        report("esr: temporaries of killed jobs not cleaned (this run holds no lock file: --nolock?)")
        return []
    lockdir = workdir / ".snakemake" / "locks"
    others = sorted(p for p in lockdir.glob("*.lock") if p.resolve() not in mine) if lockdir.is_dir() else []
    if others:
        report(
            f"esr: temporaries of killed jobs not cleaned: another Snakemake holds locks here ({others[0].name}, ...)"
        )
        return []
    older_than = min(p.stat().st_mtime for p in mine)
    roots = [workdir / r for r in OUTPUT_ROOTS] + [
        Path(r) if Path(r).is_absolute() else workdir / r for r in extra_roots
    ]
    removed = remove_stale_temporaries(roots, older_than=older_than)
    for p in removed:
        report(f"esr: removed {p} (left by a killed job)")
    return removed


def snakemake_own_locks(workflow: Any) -> list[str] | None:
    """This Snakemake run's lock files (``FilePersistence`` keeps them in ``_lockfile``, a private attribute of
    Snakemake 9; None where it has none, e.g. the database persistence backend)."""
    files = getattr(getattr(workflow, "persistence", None), "_lockfile", None)
    return list(files.values()) if isinstance(files, Mapping) else None

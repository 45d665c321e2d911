"""Compare the results of two workflow runs (e.g. before and after a refactor) and print what differs.

    python tests/benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR

For every file under ``results/`` of either run: present in both? Trials tables (``*/trials.parquet``) are compared
row for row and column by column; summaries, comparisons and the audit JSON value by value. Run-specific fields are
ignored: ``provenance`` (timestamps, git commit) and timings (``train_seconds``); renamed JSON keys are mapped with
``--rename old=new`` (repeatable) and renamed files with ``--map-path old=new``. Prints one line per file and a final count; exits 1 when
a compared file differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

IGNORED_KEYS = {"provenance", "generated_at", "created", "created_utc", "timestamp", "train_seconds"}


def _norm(value: Any, renames: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {renames.get(k, k): _norm(v, renames) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_norm(v, renames) for v in value]
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return _norm(json.loads(value), renames)
        except ValueError:
            return value
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json_diff(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'after' if k not in a else 'before'}"
            d = _json_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _json_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def compare_tables(a: Path, b: Path, renames: dict[str, str]) -> str | None:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if len(x) != len(y):
        return f"{len(x)} vs {len(y)} rows"
    if not len(x) and not len(y):
        return None
    extra = sorted(set(x.columns) ^ set(y.columns))
    if extra:
        return f"columns differ: {extra}"
    for col in x.columns:
        if col in IGNORED_KEYS:
            continue
        xs = [_norm(v.tolist() if hasattr(v, "tolist") else v, renames) for v in x[col]]
        ys = [_norm(v.tolist() if hasattr(v, "tolist") else v, renames) for v in y[col]]
        d = _json_diff(xs, ys, col)
        if d:
            return d
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument(
        "--rename", action="append", default=[], help="old=new: a renamed JSON key (also inside JSON cells of tables)"
    )
    p.add_argument("--map-path", action="append", default=[], help="old=new: a results file renamed")
    a = p.parse_args(argv)
    renames = dict(r.split("=", 1) for r in a.rename)
    paths = dict(r.split("=", 1) for r in a.map_path)
    before = {str(f.relative_to(a.before)) for f in (a.before / "results").rglob("*") if f.is_file()}
    after = {str(f.relative_to(a.after)) for f in (a.after / "results").rglob("*") if f.is_file()}
    n_same = n_diff = 0
    for rel in sorted(before):
        rel_after = paths.get(rel, rel)
        if "/shards/" in rel or ".zarr/" in rel or rel.endswith((".png", ".html", ".md", ".log")):
            continue
        if rel_after not in after:
            print(f"MISSING after: {rel}")
            n_diff += 1
            continue
        fa, fb = a.before / rel, a.after / rel_after
        if rel.endswith(".parquet"):
            d = compare_tables(fa, fb, renames)
        elif rel.endswith(".json"):
            d = _json_diff(_norm(json.loads(fa.read_text()), renames), _norm(json.loads(fb.read_text()), renames))
        else:
            continue
        print(f"{'same' if d is None else 'DIFF'}  {rel}" + ("" if d is None else f"  ({d[:300]})"))
        n_same += d is None
        n_diff += d is not None
    new = sorted(after - {paths.get(r, r) for r in before})
    new = [r for r in new if "/shards/" not in r and ".zarr/" not in r]
    for rel in new:
        print(f"new after: {rel}")
    print(f"{n_same} same, {n_diff} different, {len(new)} new")
    return 1 if n_diff else 0


if __name__ == "__main__":
    sys.exit(main())

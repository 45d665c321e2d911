"""Latent labels for the paper SAEs: download, normalise to the package's labels table, count, record provenance.

Sources (the label sources of the authors' latent selection):

* **Neuronpedia explanation exports** (the paper's source for the GemmaScope SAEs; this package's default for the
  Goodfire Llama SAEs too, see below). The public bucket holds, per model and source id,
  ``{base}/{model}/{layer_id}/explanations/batch-N.jsonl.gz`` for N = 0, 1, 2, ... Each file is gzipped JSON lines,
  one *explanation* per line. The (model, layer) ids default to the ``neuronpedia_id`` that sae-lens's pretrained-SAE
  directory (``sae_lens.loading.pretrained_saes_directory``) lists for the model's SAE ``release`` / ``sae_id``
  (:func:`neuronpedia_ids_for_sae`), e.g. ``gemma-2-2b / 16-gemmascope-res-16k`` (GemmaScope 2B layer 16) or
  ``llama3.3-70b-it / 50-resid-post-gf`` (Goodfire 70B layer 50); config ``neuronpedia_model`` /
  ``neuronpedia_layer_id`` override them. The base URL (config ``url``) pins where the export is read from; every
  batch's sha256 is recorded in the manifest and, listed in config ``batch_sha256``, checked.
* **Goodfire labels** for the Llama SAEs: a CSV ``index_in_sae,label`` (plus optional columns), what the authors
  used. The authors did not publish these files, so the user supplies a URL (http(s) or file://) or a local path,
  ideally with its sha256. Without them, ``source: neuronpedia`` gives Neuronpedia's auto-explanations of the same
  Goodfire SAEs, which are *not* the authors' labels (the report's fidelity section says so).
* ``file``: any labels CSV the user supplies (same handling as Goodfire).
* ``auto``: the embedded SAE's automatic labels (rule ``label_latents``); nothing is downloaded here.

Output: a CSV with columns ``latent,label`` first (what :func:`esr.latents.read_labels` reads), sorted by latent, one
row per latent present in the source; an unlabeled latent has an empty ``label``. Next to it a JSON manifest
records every file fetched (URL, sha256, size), the output's sha256, and the counts (labelled / empty / duplicate
records; plus missing latents when the SAE width is known). Missing and empty labels are *not* dropped here: the
selection step treats empty labels, ``feature_<idx>`` placeholders and latents absent from the table as unlabeled
and counts them under its ``unlabeled`` filter; :func:`label_counts` gives the same numbers up front.

**Assumptions about the Neuronpedia record format** (from Neuronpedia's export docs and the shape of its
``Explanation`` objects; not verified against a live download from this machine, which has no internet access):

* the latent index is in ``index`` (an int or a decimal string); ``featureIndex`` / ``feature_index`` / ``latent``
  are accepted as fallbacks;
* the label text is in ``description``; ``explanation`` / ``label`` / ``text`` are fallbacks;
* optional ``modelId`` and ``layer`` fields, when present, must equal the requested model and source id (a
  mismatch is an error: the wrong export was fetched); ``explanationModelName`` and ``typeName``, when present,
  are copied to the output as ``explanation_model`` and ``type_name``;
* a batch that is not gzipped is read as plain JSON lines; blank lines are skipped; a line that is not a JSON
  object, or has no index, is an error naming the file and line.

**Several explanations for one latent** (Neuronpedia may hold more than one, e.g. from different explainer
models): the label is the *first non-empty* description in download order (batch 0, 1, ...; line order inside a
batch). Every further record for that latent counts as a duplicate record (``n_duplicate_records``); latents whose
records carry two or more distinct non-empty texts are counted in ``n_conflicting_latents``. The number of records
seen per latent is kept in the ``n_explanations`` column.

**Resume and atomicity.** Each batch is streamed to a temporary file and renamed into a cache folder only when
complete, so the cache never holds a partial batch; a rerun after a failure reuses the cached batches (their
recorded sha256 is re-computed from the cached bytes) and fetches only the rest. The labels CSV and the manifest
are written atomically, only after every batch was fetched and parsed, so a failure never leaves a partial (or a
stale-but-new-looking) output; an existing output is left untouched. The cache is removed after success unless
``keep_cache=True``.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esr.io import atomic_path, sha256_file, write_json
from esr.latents import is_unlabeled

log = logging.getLogger("esr.labels")

NEURONPEDIA_BASE_URL = "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/v1"
LABEL_SOURCES = ("auto", "neuronpedia", "goodfire", "file")

_INDEX_KEYS = ("index", "featureIndex", "feature_index", "latent")
_TEXT_KEYS = ("description", "explanation", "label", "text")
_LATENT_COLUMNS = ("latent", "index_in_sae", "index", "feature", "feature_index", "featureIndex")
_LABEL_COLUMNS = ("label", "description", "explanation")
_USER_AGENT = "esr-labels/1.0 (+https://arxiv.org/abs/2602.06941)"


class LabelsError(RuntimeError):
    """Labels could not be fetched or parsed; the message says which file/URL and why."""


class _NotFound(Exception):
    """HTTP 404/403 (S3 answers 403 for a missing key when listing is not allowed)."""

    def __init__(self, url: str, code: int) -> None:
        super().__init__(f"{url}: HTTP {code}")
        self.url, self.code = url, code


# ---------------------------------------------------------------------------------------------------------------
# Counting


def label_counts(df: pd.DataFrame, d_sae: int | None) -> dict[str, int | None]:  # noqa: F821
    """Counts over the SAE's latents ``range(d_sae)``.

    ``labelled``: rows with a real label; ``empty``: rows whose label is empty or a ``feature_<idx>`` placeholder;
    ``missing``: latents of the SAE with no row; ``unlabeled`` = ``empty + missing``. Rows whose latent is outside
    ``range(d_sae)`` are counted in ``out_of_range`` and nowhere else; repeated latents count once (the first row)
    and the extra rows in ``duplicate_rows``. With ``d_sae=None`` the universe is unknown: ``missing`` and
    ``unlabeled`` are None and no row is out of range."""
    latent_col = next((c for c in _LATENT_COLUMNS if c in df.columns), None)
    if latent_col is None or "label" not in df.columns:
        raise LabelsError(f"labels table needs a latent column and 'label' (columns: {list(df.columns)})")
    seen: dict[int, bool] = {}
    duplicate_rows = out_of_range = 0
    for latent, label in zip(df[latent_col].tolist(), df["label"].tolist()):
        latent = int(latent)
        if latent < 0 or (d_sae is not None and latent >= d_sae):
            out_of_range += 1
            continue
        if latent in seen:
            duplicate_rows += 1
            continue
        seen[latent] = not is_unlabeled(label)
    labelled = sum(seen.values())
    empty = len(seen) - labelled
    missing = None if d_sae is None else d_sae - len(seen)
    return {
        "d_sae": d_sae,
        "rows": int(len(df)),
        "labelled": labelled,
        "empty": empty,
        "missing": missing,
        "unlabeled": None if missing is None else empty + missing,
        "out_of_range": out_of_range,
        "duplicate_rows": duplicate_rows,
    }


# ---------------------------------------------------------------------------------------------------------------
# Fetching


def _is_url(s: str) -> bool:
    return urllib.parse.urlsplit(str(s)).scheme in ("http", "https", "file")


def _fetch_to(url: str, dest: Path, timeout: float, retries: int, backoff_s: float) -> None:
    """Stream ``url`` into ``dest`` atomically. 404/403 raise :class:`_NotFound` at once; other HTTP errors,
    connection errors and timeouts are retried ``retries`` times with exponential backoff."""
    attempt = 0
    while True:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with atomic_path(dest) as tmp:
                with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as f:
                    shutil.copyfileobj(resp, f, 1 << 20)
            return
        except urllib.error.HTTPError as err:
            if err.code in (403, 404):
                raise _NotFound(url, err.code) from None
            failure: Exception = err
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, FileNotFoundError) or isinstance(err, FileNotFoundError):
                raise _NotFound(url, 404) from None  # file:// URL to a missing file
            failure = err
        if attempt >= retries:
            raise LabelsError(f"could not download {url} after {attempt + 1} attempt(s): {failure}") from failure
        wait = backoff_s * (2**attempt)
        log.warning("download of %s failed (%s); retry %d/%d in %.1f s", url, failure, attempt + 1, retries, wait)
        time.sleep(wait)
        attempt += 1


def _file_record(url: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"url": url, "file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size, **extra}


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise LabelsError(f"{path.name}: corrupt gzip data ({err})") from err
    for lineno, line in enumerate(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise LabelsError(f"{path.name} line {lineno}: not valid JSON ({err})") from err


def _first_key(rec: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    return None


@dataclass
class _Latent:
    label: str = ""
    explanation_model: str = ""
    type_name: str = ""
    n: int = 0
    texts: set[str] = field(default_factory=set)


def _parse_explanations(
    paths: list[tuple[str, Path]], model_id: str, layer_id: str
) -> tuple[dict[int, _Latent], dict[str, int], dict[str, int]]:
    latents: dict[int, _Latent] = {}
    per_file: dict[str, int] = {}
    for name, path in paths:
        n = 0
        for lineno, rec in _read_jsonl(path):
            where = f"{name} line {lineno}"
            if not isinstance(rec, dict):
                raise LabelsError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key, want in (("modelId", model_id), ("layer", layer_id)):
                if key in rec and rec[key] is not None and str(rec[key]) != want:
                    raise LabelsError(
                        f"{where}: record has {key}={rec[key]!r}, expected {want!r} "
                        "(the export is for another model/source)"
                    )
            raw_index = _first_key(rec, _INDEX_KEYS)
            try:
                index = int(str(raw_index).strip())
            except (TypeError, ValueError):
                raise LabelsError(
                    f"{where}: no integer latent index (looked for {list(_INDEX_KEYS)}; keys present: {sorted(rec)})"
                ) from None
            if index < 0:
                raise LabelsError(f"{where}: negative latent index {index}")
            text = _first_key(rec, _TEXT_KEYS)
            text = "" if text is None else " ".join(str(text).split())  # one line, trimmed
            entry = latents.setdefault(index, _Latent())
            entry.n += 1
            if text:
                entry.texts.add(text)
                if not entry.label:  # rule: first non-empty description in download order
                    entry.label = text
                    entry.explanation_model = str(rec.get("explanationModelName") or "")
                    entry.type_name = str(rec.get("typeName") or "")
            n += 1
        per_file[name] = n
    counts = {
        "n_records": sum(per_file.values()),
        "n_latents": len(latents),
        "n_labelled": sum(1 for e in latents.values() if not is_unlabeled(e.label)),
        "n_empty": sum(1 for e in latents.values() if is_unlabeled(e.label)),
        "n_duplicate_records": sum(e.n - 1 for e in latents.values()),
        "n_conflicting_latents": sum(1 for e in latents.values() if len(e.texts) > 1),
    }
    return latents, counts, per_file


def _write_csv(df: pd.DataFrame, out_csv: Path) -> None:  # noqa: F821
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)


def _default_cache(out_csv: Path) -> Path:
    return out_csv.parent / f".{out_csv.name}.download"


def fetch_neuronpedia_labels(
    model_id: str,
    layer_id: str,
    out_csv: str | os.PathLike,
    base_url: str = NEURONPEDIA_BASE_URL,
    n_batches: int | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    *,
    manifest_json: str | os.PathLike | None = None,
    explanations_folder: str = "explanations",
    d_sae: int | None = None,
    expected_sha256: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    keep_cache: bool = False,
    backoff_s: float = 2.0,
) -> dict[str, Any]:
    """Download a Neuronpedia explanations export and write the labels CSV (see the module docstring).

    Batches ``batch-0.jsonl.gz``, ``batch-1.jsonl.gz``, ... are fetched from
    ``{base_url}/{model_id}/{layer_id}/{explanations_folder}/``. With ``n_batches=None`` fetching stops at the first
    batch answered with 404/403 (there must be at least one); with an int exactly that many batches must exist.
    ``expected_sha256`` maps a batch file name to its hash; a listed batch with another hash is an error. Returns
    the manifest (also written to ``manifest_json`` when given)."""
    import pandas as pd

    out_csv = Path(out_csv)
    if n_batches is not None and int(n_batches) < 1:
        raise LabelsError(f"n_batches must be >= 1 or None, got {n_batches!r}")
    cache = Path(cache_dir) if cache_dir else _default_cache(out_csv)
    cache.mkdir(parents=True, exist_ok=True)
    prefix = f"{base_url.rstrip('/')}/{model_id}/{layer_id}/{explanations_folder}"
    expected = dict(expected_sha256 or {})

    files: list[dict[str, Any]] = []
    paths: list[tuple[str, Path]] = []
    i = 0
    while n_batches is None or i < int(n_batches):
        name = f"batch-{i}.jsonl.gz"
        url = f"{prefix}/{name}"
        dest = cache / name
        cached = dest.exists()
        if not cached:
            try:
                _fetch_to(url, dest, timeout, retries, backoff_s)
            except _NotFound as nf:
                if n_batches is None and i > 0:
                    log.info("%s: HTTP %d, taking it as the end of the export (%d batches)", url, nf.code, i)
                    break
                what = "no explanation batches at" if i == 0 else f"batch {i} of {n_batches} missing at"
                raise LabelsError(
                    f"{what} {url} (HTTP {nf.code}); check the Neuronpedia model id {model_id!r}, "
                    f"source id {layer_id!r} and the base URL"
                ) from None
        rec = _file_record(url, dest, cached=cached)
        if name in expected and rec["sha256"] != expected[name]:
            dest.unlink()  # do not reuse a bad file on the next run
            raise LabelsError(f"{url} has sha256 {rec['sha256']}, expected {expected[name]}")
        log.info(
            "%s %s (%d bytes, sha256 %s)",
            "reused" if cached else "downloaded",
            url,
            rec["size_bytes"],
            rec["sha256"][:12],
        )
        files.append(rec)
        paths.append((name, dest))
        i += 1
    missing_expected = sorted(set(expected) - {f["file"] for f in files})
    if missing_expected:
        raise LabelsError(f"expected batches not found in the export: {missing_expected}")

    latents, counts, per_file = _parse_explanations(paths, model_id, layer_id)
    for f in files:
        f["n_records"] = per_file[f["file"]]
    if not latents:
        raise LabelsError(f"the export at {prefix} holds no explanation records")
    rows = [
        {
            "latent": k,
            "label": e.label,
            "explanation_model": e.explanation_model,
            "type_name": e.type_name,
            "n_explanations": e.n,
        }
        for k, e in sorted(latents.items())
    ]
    df = pd.DataFrame(rows, columns=["latent", "label", "explanation_model", "type_name", "n_explanations"])
    _write_csv(df, out_csv)
    manifest = {
        "source": "neuronpedia",
        "neuronpedia_model": model_id,
        "neuronpedia_layer_id": layer_id,
        "base_url": base_url,
        "explanations_folder": explanations_folder,
        "n_batches": len(files),
        "duplicate_rule": "first non-empty description in download order (batch, then line)",
        "files": files,
        "counts": counts,
        "label_counts": label_counts(df, d_sae),
        "output": {"path": str(out_csv), "sha256": sha256_file(out_csv), "rows": int(len(df))},
    }
    if manifest_json is not None:
        _write_manifest(manifest_json, manifest)
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    log.info(
        "wrote %s: %d latents, %d labelled, %d empty, %d duplicate records",
        out_csv,
        counts["n_latents"],
        counts["n_labelled"],
        counts["n_empty"],
        counts["n_duplicate_records"],
    )
    return manifest


def _write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    from esr.provenance import provenance

    write_json(path, {**manifest, "provenance": provenance()})


def check_label_columns(df: pd.DataFrame, src: str) -> pd.DataFrame:  # noqa: F821
    """``df`` (a labels CSV read as strings) with its latent column renamed ``latent`` (int64) and its label column
    ``label``. Raises ``LabelsError`` naming ``src`` for a missing column, a non-integer or a negative latent."""
    import pandas as pd

    latent_col = next((c for c in _LATENT_COLUMNS if c in df.columns), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in df.columns), None)
    if latent_col is None or label_col is None:
        raise LabelsError(
            f"labels file {src} needs a latent column (one of {list(_LATENT_COLUMNS)}) and a label "
            f"column (one of {list(_LABEL_COLUMNS)}); it has {list(df.columns)}"
        )
    df = df.rename(columns={latent_col: "latent", label_col: "label"})
    try:
        df["latent"] = pd.to_numeric(df["latent"].str.strip(), errors="raise").astype("int64")
    except (ValueError, TypeError) as err:
        raise LabelsError(f"labels file {src}: column {latent_col!r} must hold integers ({err})") from None
    if (df["latent"] < 0).any():
        raise LabelsError(f"labels file {src}: negative latent index {int(df['latent'][df['latent'] < 0].iloc[0])}")
    return df


def fetch_csv_labels(
    url_or_path: str | os.PathLike,
    out_csv: str | os.PathLike,
    sha256: str | None = None,
    *,
    manifest_json: str | os.PathLike | None = None,
    d_sae: int | None = None,
    source: str = "file",
    timeout: float = 60.0,
    retries: int = 3,
    backoff_s: float = 2.0,
) -> dict[str, Any]:
    """Fetch a labels CSV (e.g. Goodfire's ``index_in_sae,label``) from an http(s)/file:// URL or a local path,
    check it against ``sha256`` when given (else record its hash), and write the normalised table to ``out_csv``.

    Normalisation: the latent column (``latent``, ``index_in_sae``, ``index``, ``feature``, ...) becomes ``latent``
    and the label column (``label``, ``description``, ``explanation``) becomes ``label``; other columns are kept;
    rows are sorted by latent; labels are trimmed (an empty label stays empty, placeholders ``feature_<idx>`` are
    kept as they are and counted as empty). A latent listed twice keeps its first non-empty label (the extra rows
    are counted in ``n_duplicate_records``). Returns the manifest (also written to ``manifest_json`` when given)."""
    import pandas as pd

    out_csv = Path(out_csv)
    src = str(url_or_path)
    cache = _default_cache(out_csv)
    cache.mkdir(parents=True, exist_ok=True)
    local = cache / "labels_source.csv"
    try:
        if _is_url(src):
            try:
                _fetch_to(src, local, timeout, retries, backoff_s)
            except _NotFound as nf:
                raise LabelsError(f"labels file not found at {src} (HTTP {nf.code})") from None
        else:
            if not Path(src).is_file():
                raise LabelsError(f"labels file {src} does not exist")
            with atomic_path(local) as tmp:
                shutil.copyfile(src, tmp)
        got = sha256_file(local)
        if sha256 and got != sha256.lower():
            raise LabelsError(
                f"labels file {src} has sha256 {got}, expected {sha256} (labels.sha256); refusing to use it"
            )
        size = local.stat().st_size
        try:
            df = pd.read_csv(local, dtype=str, keep_default_na=False, na_values=[])
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise LabelsError(f"labels file {src} is not a readable CSV ({err})") from err
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    df = check_label_columns(df, src)
    df["label"] = [" ".join(str(v).split()) for v in df["label"]]
    n_rows = len(df)
    # keep the first non-empty label per latent (stable order), else the first row
    df["_empty"] = [is_unlabeled(v) for v in df["label"]]
    df = df.reset_index(drop=True)
    df["_row"] = range(len(df))
    conflicting = int((df[~df["_empty"]].groupby("latent")["label"].nunique() > 1).sum())
    df = df.sort_values(["latent", "_empty", "_row"], kind="stable").drop_duplicates("latent", keep="first")
    df = df.drop(columns=["_empty", "_row"])
    cols = ["latent", "label"] + [c for c in df.columns if c not in ("latent", "label")]
    df = df[cols].reset_index(drop=True)
    if df.empty:
        raise LabelsError(f"labels file {src} has no rows")
    _write_csv(df, out_csv)
    lc = label_counts(df, d_sae)
    empties = sum(1 for v in df["label"] if is_unlabeled(v))
    n_empty_labelled = (empties, int(len(df)) - empties)
    manifest = {
        "source": source,
        "files": [{"url": src, "sha256": got, "size_bytes": size, "sha256_verified": bool(sha256)}],
        "duplicate_rule": "first non-empty label in file order",
        "counts": {
            "n_records": n_rows,
            "n_latents": int(len(df)),
            "n_labelled": n_empty_labelled[1],
            "n_empty": n_empty_labelled[0],
            "n_duplicate_records": n_rows - int(len(df)),
            "n_conflicting_latents": conflicting,
        },
        "label_counts": lc,
        "output": {"path": str(out_csv), "sha256": sha256_file(out_csv), "rows": int(len(df))},
    }
    if manifest_json is not None:
        _write_manifest(manifest_json, manifest)
    log.info("wrote %s from %s (sha256 %s): %d latents, %d labelled", out_csv, src, got[:12], len(df), lc["labelled"])
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Stage


def _sae_field(sae: Any, key: str) -> Any:
    if sae is None:
        return None
    if isinstance(sae, Mapping):
        return sae.get(key)
    return getattr(sae, key, None)


def neuronpedia_ids_for_sae(*, release: str, sae_id: str) -> tuple[str, str] | None:
    """The (Neuronpedia model id, source/layer id) that sae-lens's pretrained-SAE directory lists for an SAE, or
    ``None`` when the release is not in the directory or has no Neuronpedia id for ``sae_id``.

    Source: ``sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()[release].neuronpedia_id``
    (sae-lens's ``pretrained_saes.yaml``), whose values read ``"<model>/<layer id>"``, e.g.
    ``goodfire-llama-3.3-70b-instruct`` / ``layer_50`` -> ``("llama3.3-70b-it", "50-resid-post-gf")``.
    Raises :class:`LabelsError` for a directory entry that is not of the form ``model/layer``."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        return None
    np_id = (getattr(lookup, "neuronpedia_id", None) or {}).get(sae_id)
    if not np_id:
        return None
    model_id, _, layer_id = str(np_id).partition("/")
    if not model_id or not layer_id:
        raise LabelsError(
            f"sae-lens directory: neuronpedia id {np_id!r} of {release}/{sae_id} is not of the form 'model/layer'"
        )
    return model_id, layer_id


def resolve_neuronpedia_ids(
    *, labels: Mapping[str, Any], sae: Any = None, model_name: str = "?"
) -> tuple[str, str, str]:
    """``(neuronpedia model id, layer id, where they came from)`` for config ``models.<model_name>.labels``.

    Config ``neuronpedia_model`` / ``neuronpedia_layer_id`` win; each one not given comes from sae-lens's directory
    for the model's SAE (``sae``: a :class:`esr.config.SAESpec` or the ``models.<m>.sae`` mapping, read for
    ``release`` and ``sae_id``; :func:`neuronpedia_ids_for_sae`). Raises :class:`LabelsError` naming the keys when
    neither gives an id."""
    where = f"models.{model_name}.labels"
    cfg_model, cfg_layer = labels.get("neuronpedia_model"), labels.get("neuronpedia_layer_id")
    release, sae_id = _sae_field(sae, "release"), _sae_field(sae, "sae_id")
    directory = None
    if not (cfg_model and cfg_layer) and release and sae_id:
        directory = neuronpedia_ids_for_sae(release=str(release), sae_id=str(sae_id))
    np_model = cfg_model or (directory[0] if directory else None)
    np_layer = cfg_layer or (directory[1] if directory else None)
    if not np_model or not np_layer:
        sae_desc = (
            f"sae-lens's directory lists no Neuronpedia id for release {release!r} / sae_id {sae_id!r}"
            if release and sae_id
            else f"models.{model_name}.sae has no sae-lens release/sae_id to look the ids up"
        )
        raise LabelsError(
            f"{where}: source 'neuronpedia' needs {where}.neuronpedia_model and {where}.neuronpedia_layer_id: "
            f"{sae_desc}; set both keys (e.g. neuronpedia_model: gemma-2-2b, neuronpedia_layer_id: "
            "16-gemmascope-res-16k)"
        )
    if cfg_model and cfg_layer:
        origin = "config"
    elif cfg_model or cfg_layer:
        origin = f"config + sae-lens directory ({release}/{sae_id})"
    else:
        origin = f"sae-lens directory ({release}/{sae_id})"
    return str(np_model), str(np_layer), origin


def is_goodfire_release(release: str | None) -> bool:
    """Whether an sae-lens release name is one of Goodfire's SAEs (sae-lens names them ``goodfire-*``)."""
    return bool(release) and str(release).lower().startswith("goodfire")


def fetch_labels(
    spec_labels: Mapping[str, Any],
    model_name: str,
    out_csv: str | os.PathLike,
    manifest_json: str | os.PathLike,
    d_sae: int | None = None,
    *,
    sae: Any = None,
) -> dict[str, Any]:
    """The labels of a published SAE (the ``download_labels`` rule): dispatch on ``spec_labels['source']`` (config
    ``models.<m>.labels``); ``sae`` is the model's SAE (:class:`esr.config.SAESpec` or config ``models.<m>.sae``).

    * ``neuronpedia``: ids from ``neuronpedia_model`` / ``neuronpedia_layer_id``, by default sae-lens's directory
      entry for the SAE's release/sae_id (:func:`resolve_neuronpedia_ids`); base URL from ``url`` (default
      :data:`NEURONPEDIA_BASE_URL`), optional ``n_batches``, ``explanations_folder``, ``batch_sha256`` (file name
      -> sha256, checked), ``timeout_s``, ``retries``. The manifest records the ids, where they came from, and
      whether these are Neuronpedia's explanations of a Goodfire SAE (not the authors' Goodfire labels);
    * ``goodfire`` / ``file``: ``url`` or ``path`` (one is required), optional ``sha256``;
    * ``auto``: an error; the embedded SAE's labels are made by rule ``label_latents``, not downloaded.

    Raises :class:`LabelsError` (missing ids or URL, download/parse/hash failures)."""
    cfg = dict(spec_labels or {})
    source = cfg.get("source", "auto")
    where = f"models.{model_name}.labels"
    timeout = float(cfg.get("timeout_s", 60.0))
    retries = int(cfg.get("retries", 3))
    if source == "neuronpedia":
        np_model, np_layer, origin = resolve_neuronpedia_ids(labels=cfg, sae=sae, model_name=model_name)
        log.info("%s: Neuronpedia ids %s / %s (from %s)", where, np_model, np_layer, origin)
        manifest = fetch_neuronpedia_labels(
            np_model,
            np_layer,
            out_csv,
            base_url=cfg.get("url") or NEURONPEDIA_BASE_URL,
            n_batches=cfg.get("n_batches"),
            timeout=timeout,
            retries=retries,
            manifest_json=None,
            explanations_folder=cfg.get("explanations_folder", "explanations"),
            d_sae=d_sae,
            expected_sha256=cfg.get("batch_sha256"),
        )
        release = _sae_field(sae, "release")
        manifest.update(
            neuronpedia_ids_from=origin,
            sae_release=release,
            sae_id=_sae_field(sae, "sae_id"),
            batch_sha256_checked=sorted((cfg.get("batch_sha256") or {}).keys()),
            goodfire_sae_with_neuronpedia_labels=is_goodfire_release(release),
        )
        if is_goodfire_release(release):
            manifest["note"] = (
                "Neuronpedia's auto-explanations of the Goodfire SAE, not the Goodfire labels the authors used"
            )
        _write_manifest(manifest_json, manifest)
        return manifest
    if source in ("goodfire", "file"):
        src = cfg.get("url") or cfg.get("path")
        if not src:
            hint = (
                " The authors did not publish their Goodfire label CSVs (columns index_in_sae,label): supply "
                "one yourself."
                if source == "goodfire"
                else ""
            )
            raise LabelsError(f"{where}: source {source!r} needs 'url' (http(s):// or file://) or 'path'.{hint}")
        return fetch_csv_labels(
            src,
            out_csv,
            sha256=cfg.get("sha256"),
            manifest_json=manifest_json,
            d_sae=d_sae,
            source=source,
            timeout=timeout,
            retries=retries,
        )
    if source == "auto":
        raise LabelsError(
            f"{where}: source 'auto' means the embedded SAE's automatic labels (rule label_latents "
            "writes resources/labels/<model>.csv); there is nothing to download"
        )
    raise LabelsError(f"{where}.source must be one of {list(LABEL_SOURCES)}, got {source!r}")

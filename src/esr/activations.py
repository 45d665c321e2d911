"""Per-token SAE activation store: chunked Zarr v3 written through xarray, validated on open.

Layout of one store (``<name>.zarr``, one per job; ``gather_stores`` concatenates a model's shards):

* dims ``trial`` (T), ``token`` (K = max response tokens, padded), ``latent`` (L stored densely), ``topk`` (k).
* coords ``trial`` (trial id, str), ``token`` (response-relative position, int32), ``latent`` (SAE index, int64),
  ``token_text`` (trial, token; str, "" on padding), ``region`` (trial, token; str label, "" on padding),
  ``steered_latent`` (trial; int64, -1 when the trial is unsteered or the steered latent was not captured).
* data ``acts`` (trial, token, latent) float16|float32, NaN beyond ``n_tokens``; ``n_tokens`` (trial) int32, the valid
  length; ``steered_acts`` (trial, token), the steered latent's own activation (it changes from trial to trial, so
  it cannot live on the shared ``latent`` axis); optional sparse companion ``topk_indices`` (trial, token, topk)
  int32 (-1 fill) and ``topk_values`` (trial, token, topk) float16|float32 (NaN fill): the top-k of *all* latents.
* chunking: ``acts`` is chunked ``(trials_per_chunk, K, latents_per_chunk)``, default ``(64, K, 1)``. Reading one
  latent for all trials then touches exactly ``ceil(T / trials_per_chunk)`` chunk files and nothing else; reading one
  trial for all latents touches ``ceil(L / latents_per_chunk)`` files. Latent-blocked chunks (``latents_per_chunk``
  > 1) mean fewer, larger files, but a one-latent read decompresses ``latents_per_chunk`` times more data. The
  analyses here read a few latents across all trials, hence the default. On parallel file systems where many small
  files hurt, pass ``shard_trials``: Zarr v3 sharding packs the inner chunks of ``shard_trials`` trials x all latents
  into one file while a one-latent read still fetches only its inner chunks (byte ranges).
* codec: Blosc zstd (clevel 5) with byte shuffle (``zarr.codecs.BloscCodec``) on every numeric array; vlen-utf8 +
  zstd for strings. All-fill chunks are not written (Zarr 3 default ``write_empty_chunks=False``).
* markers: root attrs carry ``esr_format``, ``latent_groups``, ``max_tokens``, ``provenance``. The completion marker
  is the child group ``_esr`` (``_esr/zarr.json``, a valid empty Zarr group xarray ignores) whose attributes hold
  ``complete: true``, ``n_trials`` and a manifest of every other file in the store with its size and sha256. It is
  written last, inside a temporary directory that is renamed onto the final path (``esr.io.atomic_path``).
  ``open_store`` refuses a store without the marker, with missing/extra/resized files (or, with
  ``verify="hash"``, changed bytes) and with a trial count that disagrees with the marker.

Metadata is not consolidated: a store has fewer than a dozen arrays, so opening is cheap without it, and v3
consolidated metadata is outside the Zarr spec.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "esr-activations/1"
MARKER_GROUP = "_esr"
MARKER_FILE = f"{MARKER_GROUP}/zarr.json"
PAD_REGION = ""
NO_LATENT = -1


class StoreError(RuntimeError):
    """An activation store that must not be read."""


class IncompleteStoreError(StoreError):
    """The store has no completion marker: its writer did not finish."""


class CorruptStoreError(StoreError):
    """The store's files disagree with its manifest (missing, extra, resized or changed files)."""


@dataclass
class ActivationRecord:
    """Per-token activations of one trial (response tokens only; token 0 = first response token).

    ``acts``: [n_tokens, n_latents] for the store's shared latent list, in that order.
    ``token_texts``/``region_labels``: one string per token (regions default to "").
    ``topk_indices``/``topk_values``: optional [n_tokens, k] top-k of all SAE latents.
    ``steered_latent``/``steered_acts``: optional id and [n_tokens] activation of the latent steered in this trial."""

    trial_id: str
    acts: np.ndarray
    token_texts: Sequence[str]
    region_labels: Sequence[str] | None = None
    topk_indices: np.ndarray | None = None
    topk_values: np.ndarray | None = None
    steered_latent: int | None = None
    steered_acts: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(np.asarray(self.acts).shape[0])

    def validate(self, n_latents: int) -> None:
        """Raise ValueError (naming the trial) if shapes disagree."""
        acts = np.asarray(self.acts)
        where = f"trial {self.trial_id!r}"
        if acts.ndim != 2 or acts.shape[1] != n_latents:
            raise ValueError(f"{where}: acts has shape {acts.shape}, expected (n_tokens, {n_latents})")
        n = acts.shape[0]
        if len(self.token_texts) != n:
            raise ValueError(f"{where}: {len(self.token_texts)} token texts for {n} tokens")
        if self.region_labels is not None and len(self.region_labels) != n:
            raise ValueError(f"{where}: {len(self.region_labels)} region labels for {n} tokens")
        if (self.topk_indices is None) != (self.topk_values is None):
            raise ValueError(f"{where}: topk_indices and topk_values must be given together")
        if self.topk_indices is not None:
            ti, tv = np.asarray(self.topk_indices), np.asarray(self.topk_values)
            if ti.ndim != 2 or ti.shape[0] != n or ti.shape != tv.shape:
                raise ValueError(f"{where}: top-k shapes {ti.shape}/{tv.shape}, expected ({n}, k) each")
        if self.steered_acts is not None:
            if self.steered_latent is None:
                raise ValueError(f"{where}: steered_acts given without steered_latent")
            if np.asarray(self.steered_acts).shape != (n,):
                shape = np.asarray(self.steered_acts).shape
                raise ValueError(f"{where}: steered_acts has shape {shape}, expected ({n},)")


def record_from_capture(
    trial_id: str,
    capture: Any,
    capture_latents: Sequence[int],
    store_latents: Sequence[int],
    token_texts: Sequence[str],
    region_labels: Sequence[str] | None = None,
    steered_latent: int | None = None,
    topk: tuple[Any, Any] | None = None,
) -> ActivationRecord:
    """Build a record from a steering-engine capture tensor [n_tokens, n_capture] whose columns are
    ``capture_latents``. Columns for ``store_latents`` (and ``steered_latent`` if captured) are picked by id."""
    cap = _to_numpy(capture)
    col = {int(l): i for i, l in enumerate(capture_latents)}
    if cap.ndim != 2 or cap.shape[1] != len(col):
        raise ValueError(f"trial {trial_id!r}: capture shape {cap.shape} does not match {len(col)} capture latents")
    missing = [int(l) for l in store_latents if int(l) not in col]
    if missing:
        raise ValueError(f"trial {trial_id!r}: store latents not captured: {missing[:10]}")
    acts = cap[:, [col[int(l)] for l in store_latents]]
    steered = cap[:, col[int(steered_latent)]] if steered_latent is not None and int(steered_latent) in col else None
    ti, tv = (None, None) if topk is None else (_to_numpy(topk[0]), _to_numpy(topk[1]))
    return ActivationRecord(
        trial_id,
        acts,
        list(token_texts),
        None if region_labels is None else list(region_labels),
        ti,
        tv,
        None if steered_latent is None else int(steered_latent),
        steered,
    )


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; bf16 has no numpy dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _cast(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if np.issubdtype(dtype, np.floating) and np.any(np.isinf(out) & np.isfinite(values)):
        raise ValueError(f"{what}: values overflow {dtype}; store as float32")
    return out


def build_dataset(
    records: Sequence[ActivationRecord],
    latents: Sequence[int],
    *,
    max_tokens: int | None = None,
    dtype: str = "float16",
    latent_groups: Mapping[str, Sequence[int]] | None = None,
    attrs: Mapping[str, Any] | None = None,
):
    """Assemble records into an in-memory ``xarray.Dataset`` with the store layout (padding filled)."""
    import xarray as xr

    if not records:
        raise ValueError("no records: an activation store needs at least one trial")
    latents = [int(l) for l in latents]
    if len(set(latents)) != len(latents):
        raise ValueError("latent ids must be unique")
    ids = [str(r.trial_id) for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate trial ids: {dup[:10]}")
    for r in records:
        r.validate(len(latents))
    K = max(r.n_tokens for r in records) if max_tokens is None else int(max_tokens)
    over = [r.trial_id for r in records if r.n_tokens > K]
    if over:
        raise ValueError(f"trials longer than max_tokens={K}: {over[:10]}")
    dt = np.dtype(dtype)
    T, L = len(records), len(latents)
    acts = np.full((T, K, L), np.nan, dt)
    steered = np.full((T, K), np.nan, dt)
    steered_id = np.full(T, NO_LATENT, np.int64)
    ntok = np.zeros(T, np.int32)
    texts = np.full((T, K), "", dtype=object)
    regions = np.full((T, K), PAD_REGION, dtype=object)
    ks = {np.asarray(r.topk_indices).shape[1] for r in records if r.topk_indices is not None}
    if len(ks) > 1 or (ks and any(r.topk_indices is None for r in records)):
        raise ValueError("top-k must be given for all records or none, with one k")
    k = ks.pop() if ks else 0
    tki = np.full((T, K, k), -1, np.int32) if k else None
    tkv = np.full((T, K, k), np.nan, dt) if k else None
    for i, r in enumerate(records):
        n = r.n_tokens
        ntok[i] = n
        acts[i, :n] = _cast(np.asarray(r.acts, dtype=np.float64), dt, f"trial {r.trial_id!r} acts")
        texts[i, :n] = [str(t) for t in r.token_texts]
        if r.region_labels is not None:
            regions[i, :n] = [str(t) for t in r.region_labels]
        if r.steered_latent is not None:
            steered_id[i] = int(r.steered_latent)
        if r.steered_acts is not None:
            steered[i, :n] = _cast(np.asarray(r.steered_acts, np.float64), dt, f"trial {r.trial_id!r} steered_acts")
        if k:
            tki[i, :n] = np.asarray(r.topk_indices).astype(np.int32)
            tkv[i, :n] = _cast(np.asarray(r.topk_values, np.float64), dt, f"trial {r.trial_id!r} topk_values")
    data = {
        "acts": (("trial", "token", "latent"), acts),
        "n_tokens": (("trial",), ntok),
        "steered_acts": (("trial", "token"), steered),
    }
    if k:
        data["topk_indices"] = (("trial", "token", "topk"), tki)
        data["topk_values"] = (("trial", "token", "topk"), tkv)
    coords = {
        "trial": np.array(ids, dtype=object),
        "token": np.arange(K, dtype=np.int32),
        "latent": np.array(latents, dtype=np.int64),
        "token_text": (("trial", "token"), texts),
        "region": (("trial", "token"), regions),
        "steered_latent": (("trial",), steered_id),
    }
    groups = {str(g): [int(x) for x in v] for g, v in (latent_groups or {}).items()}
    for g, members in groups.items():
        unknown = sorted(set(members) - set(latents))
        if unknown:
            raise ValueError(f"latent group {g!r} names latents not stored: {unknown[:10]}")
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(dict(attrs or {}))
    ds.attrs.update({"esr_format": FORMAT, "latent_groups": groups, "max_tokens": K, "dtype": dt.name, "topk_k": k})
    return ds


def _encoding(ds, trials_per_chunk: int, latents_per_chunk: int, shard_trials: int | None, clevel: int) -> dict:
    import zarr

    T, K, L = ds.sizes["trial"], ds.sizes["token"], ds.sizes["latent"]
    tc = max(1, min(trials_per_chunk, T))
    lc = max(1, min(latents_per_chunk, L))
    comp = (zarr.codecs.BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle"),)
    enc: dict[str, dict[str, Any]] = {"acts": {"chunks": (tc, K, lc), "compressors": comp}}
    if shard_trials:
        if shard_trials % tc:
            raise ValueError(f"shard_trials={shard_trials} must be a multiple of trials_per_chunk={tc}")
        enc["acts"]["shards"] = (shard_trials, K, math.ceil(L / lc) * lc)
    for name in ("steered_acts", "token_text", "region"):
        enc[name] = {"chunks": (tc, K)}
    for name in ("steered_acts",):
        enc[name]["compressors"] = comp
    if "topk_indices" in ds:
        k = ds.sizes["topk"]
        enc["topk_indices"] = {"chunks": (tc, K, k), "compressors": comp, "fill_value": -1}
        enc["topk_values"] = {"chunks": (tc, K, k), "compressors": comp}
    return enc


def write_store(
    path: str | os.PathLike,
    records: Sequence[ActivationRecord],
    latents: Sequence[int],
    *,
    max_tokens: int | None = None,
    dtype: str = "float16",
    latent_groups: Mapping[str, Sequence[int]] | None = None,
    trials_per_chunk: int = 64,
    latents_per_chunk: int = 1,
    shard_trials: int | None = None,
    clevel: int = 5,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write records to a Zarr v3 store at ``path`` atomically (temporary directory + rename), marker last."""
    ds = build_dataset(
        records,
        latents,
        max_tokens=max_tokens,
        dtype=dtype,
        latent_groups=latent_groups,
        attrs={"provenance": dict(provenance or {})},
    )
    return write_dataset(
        path,
        ds,
        trials_per_chunk=trials_per_chunk,
        latents_per_chunk=latents_per_chunk,
        shard_trials=shard_trials,
        clevel=clevel,
        overwrite=overwrite,
    )


def write_dataset(
    path: str | os.PathLike,
    ds,
    *,
    trials_per_chunk: int = 64,
    latents_per_chunk: int = 1,
    shard_trials: int | None = None,
    clevel: int = 5,
    overwrite: bool = False,
) -> Path:
    """Write a dataset built by ``build_dataset`` (or read from a store) atomically, with the completion marker."""
    from esr.io import atomic_path

    path = Path(path)
    _check_target(path, overwrite)
    ds = ds.drop_encoding()
    enc = _encoding(ds, trials_per_chunk, latents_per_chunk, shard_trials, clevel)
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=enc)
        _write_marker(tmp, ds.sizes["trial"])
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: activation store exists (pass overwrite=True to replace it)")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _store_files(root: Path) -> dict[str, Path]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != MARKER_FILE:
                out[rel] = p
    return out


def _write_marker(root: Path, n_trials: int) -> None:
    files = {rel: [p.stat().st_size, _sha256(p)] for rel, p in sorted(_store_files(root).items())}
    meta = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {"complete": True, "format": FORMAT, "n_trials": int(n_trials), "files": files},
    }
    (root / MARKER_GROUP).mkdir(exist_ok=True)
    (root / MARKER_FILE).write_text(json.dumps(meta, indent=0) + "\n", encoding="utf-8")


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The completion marker's attributes; IncompleteStoreError if it is absent or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: activation store not found")
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise IncompleteStoreError(
            f"{path}: incomplete activation store (no completion marker {MARKER_FILE}); "
            "its writer did not finish or the marker was removed: delete and rewrite it"
        )
    try:
        attrs = json.loads(marker.read_text(encoding="utf-8"))["attributes"]
    except (ValueError, KeyError) as e:
        raise IncompleteStoreError(f"{marker}: unreadable completion marker ({e})") from e
    if attrs.get("complete") is not True or attrs.get("format") != FORMAT:
        raise IncompleteStoreError(f"{marker}: store not marked complete with format {FORMAT!r}")
    return attrs


IGNORED_FILES = (".snakemake_timestamp",)


def verify_store(path: str | os.PathLike, verify: str = "size") -> dict[str, Any]:
    """Check the store against its manifest: every listed file present with its size (``verify="size"``) or also
    its sha256 (``"hash"``), and no unlisted file. Returns the marker attributes; raises a StoreError otherwise."""
    if verify not in ("size", "hash"):
        raise ValueError(f"verify must be 'size' or 'hash', not {verify!r}")
    path = Path(path)
    attrs = read_marker(path)
    listed: dict[str, list] = attrs["files"]
    present = _store_files(path)
    missing = sorted(set(listed) - set(present))
    if missing:
        raise CorruptStoreError(f"{path}: {len(missing)} file(s) missing from the store, e.g. {missing[:3]}")
    # Snakemake marks directory() outputs with a timestamp file; it is not store content
    extra = sorted(set(present) - set(listed) - set(IGNORED_FILES))
    if extra:
        raise CorruptStoreError(f"{path}: {len(extra)} file(s) not in the manifest, e.g. {extra[:3]}")
    for rel, (size, digest) in listed.items():
        p = present[rel]
        if p.stat().st_size != size:
            raise CorruptStoreError(f"{p}: size {p.stat().st_size} != {size} recorded in the manifest")
        if verify == "hash" and _sha256(p) != digest:
            raise CorruptStoreError(f"{p}: sha256 differs from the manifest")
    return attrs


def open_store(path: str | os.PathLike, verify: str = "size"):
    """Validate the store and return it as a lazy ``xarray.Dataset`` (no dask needed: indexing reads only the
    chunks it touches). Raises IncompleteStoreError / CorruptStoreError rather than returning fill values."""
    import xarray as xr

    path = Path(path)
    attrs = verify_store(path, verify)
    with warnings.catch_warnings():  # Snakemake's timestamp file inside directory() outputs is not a Zarr node
        warnings.filterwarnings("ignore", message=r".*\.snakemake_timestamp.*")
        ds = xr.open_zarr(path, consolidated=False, chunks=None, zarr_format=3)
    if ds.attrs.get("esr_format") != FORMAT:
        raise CorruptStoreError(f"{path}: root attribute esr_format is {ds.attrs.get('esr_format')!r}, not {FORMAT!r}")
    if ds.sizes.get("trial") != attrs["n_trials"]:
        raise CorruptStoreError(f"{path}: {ds.sizes.get('trial')} trials, marker says {attrs['n_trials']}")
    return ds


def gather_stores(
    shard_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    trials_per_chunk: int = 64,
    latents_per_chunk: int = 1,
    shard_trials: int | None = None,
    clevel: int = 5,
    overwrite: bool = False,
    verify: str = "size",
) -> Path:
    """Concatenate validated shard stores along ``trial`` into one store, sequentially (one shard in memory at a
    time; never concurrent appends). Shards must agree on latents, groups, dtype and top-k; tokens are padded to
    the longest shard; trial ids must be unique. Written atomically with a fresh marker."""
    import xarray as xr

    from esr.io import atomic_path

    if not shard_paths:
        raise ValueError("gather_stores: no shard paths")
    out_path = Path(out_path)
    _check_target(out_path, overwrite)
    shards = [open_store(p, verify) for p in shard_paths]
    ref, ref_path = shards[0], Path(shard_paths[0])
    for p, ds in zip(shard_paths[1:], shards[1:]):
        _check_compatible(ref, ref_path, ds, Path(p))
    seen: dict[str, str] = {}
    for p, ds in zip(shard_paths, shards):
        for t in ds.trial.values.tolist():
            if t in seen:
                raise ValueError(f"trial id {t!r} in both {seen[t]} and {p}")
            seen[t] = str(p)
    K = max(ds.sizes["token"] for ds in shards)
    n = sum(ds.sizes["trial"] for ds in shards)
    fill = {
        "acts": np.nan,
        "steered_acts": np.nan,
        "topk_values": np.nan,
        "topk_indices": -1,
        "token_text": "",
        "region": PAD_REGION,
    }
    attrs = {k: v for k, v in ref.attrs.items()}
    attrs["max_tokens"] = K
    attrs["gathered_from"] = [str(p) for p in shard_paths]
    attrs["provenance"] = {"shards": [ds.attrs.get("provenance", {}) for ds in shards]}
    with atomic_path(out_path) as tmp:
        for i, ds in enumerate(shards):
            part = ds.load().drop_encoding()
            if part.sizes["token"] < K:
                part = part.reindex(token=np.arange(K, dtype=np.int32), fill_value=fill)
            part.attrs = attrs
            if i == 0:
                enc = _encoding(part, trials_per_chunk, latents_per_chunk, shard_trials, clevel)
                enc = _fix_trial_chunks(enc, n, trials_per_chunk)
                part.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=enc)
            else:
                part.to_zarr(tmp, mode="a", append_dim="trial", zarr_format=3, consolidated=False)
            ds.close()
        _write_marker(tmp, n)
        check = xr.open_zarr(tmp, consolidated=False, chunks=None, zarr_format=3)
        if check.sizes["trial"] != n:
            raise StoreError(f"{out_path}: gathered {check.sizes['trial']} trials, expected {n}")
    return out_path


def _fix_trial_chunks(enc: dict, n_total: int, trials_per_chunk: int) -> dict:
    """Chunk sizes along trial come from the full gathered length, not the first shard's."""
    tc = max(1, min(trials_per_chunk, n_total))
    for spec in enc.values():
        spec["chunks"] = (tc,) + tuple(spec["chunks"][1:])
    return enc


def _check_compatible(ref, ref_path: Path, ds, path: Path) -> None:
    if not np.array_equal(ref.latent.values, ds.latent.values):
        raise ValueError(f"{path}: latent coordinate differs from {ref_path}")
    for key in ("latent_groups", "dtype", "topk_k", "esr_format"):
        if ref.attrs.get(key) != ds.attrs.get(key):
            raise ValueError(
                f"{path}: attribute {key!r} = {ds.attrs.get(key)!r} differs from {ref_path} ({ref.attrs.get(key)!r})"
            )
    if set(ref.data_vars) != set(ds.data_vars):
        raise ValueError(f"{path}: variables {sorted(ds.data_vars)} differ from {ref_path} {sorted(ref.data_vars)}")


# ----------------------------------------------------------------------------------------------------------------
# Size planning

#: The paper's five models and their SAE widths (config/paper.yaml).
PAPER_MODELS: dict[str, int] = {
    "llama-3.3-70b": 65536,
    "llama-3.1-8b": 65536,
    "gemma-2-2b": 16384,
    "gemma-2-9b": 16384,
    "gemma-2-27b": 131072,
}


@dataclass(frozen=True)
class SizeEstimate:
    model: str
    n_trials: int
    n_tokens: int
    n_latents: int
    d_sae: int
    dense_bytes: int
    topk_bytes: int
    all_latents_dense_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.topk_bytes


def estimate_size(
    model: str,
    d_sae: int,
    *,
    n_trials: int = 2500,
    n_tokens: int = 512,
    n_latents: int = 146,
    dtype: str = "float16",
    topk: int = 64,
    topk_index_dtype: str = "int32",
    topk_value_dtype: str = "float16",
) -> SizeEstimate:
    """Uncompressed bytes of one model's store: dense (trials x tokens x latents x dtype; ``n_latents`` counts
    the per-trial steered column) and the sparse top-k companion (indices + values). Padding to n_tokens included."""
    item = np.dtype(dtype).itemsize
    dense = n_trials * n_tokens * n_latents * item
    sparse = n_trials * n_tokens * topk * (np.dtype(topk_index_dtype).itemsize + np.dtype(topk_value_dtype).itemsize)
    full = n_trials * n_tokens * d_sae * item
    return SizeEstimate(model, n_trials, n_tokens, n_latents, d_sae, dense, sparse, full)


def paper_latent_count(
    n_steered: int = 1,
    n_otd_a: int = 26,
    n_otd_b: int = 25,
    n_random_sets: int = 3,
    random_set_size: int = 26,
    n_backtracking: int = 16,
) -> int:
    """Upper bound on stored dense latents (overlaps between sets, e.g. 33044, only make it smaller). The steered
    latent is stored per trial in ``steered_acts``; it is counted here as in the paper plan."""
    return n_steered + n_otd_a + n_otd_b + n_random_sets * random_set_size + n_backtracking


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_estimates(rows: Sequence[SizeEstimate], dtype: str) -> str:
    head = (
        f"{'model':<15} {'trials':>7} {'tokens':>6} {'latents':>7} {'dense ' + dtype:>15} {'top-k':>12} "
        f"{'total':>12} {'all d_sae dense':>16}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<15} {r.n_trials:>7} {r.n_tokens:>6} {r.n_latents:>7} {_fmt_bytes(r.dense_bytes):>15} "
            f"{_fmt_bytes(r.topk_bytes):>12} {_fmt_bytes(r.total_bytes):>12} "
            f"{_fmt_bytes(r.all_latents_dense_bytes):>16}"
        )
    tot = sum(r.total_bytes for r in rows)
    lines.append("-" * len(head))
    lines.append(
        f"{'all models':<15} {'':>7} {'':>6} {'':>7} {_fmt_bytes(sum(r.dense_bytes for r in rows)):>15} "
        f"{_fmt_bytes(sum(r.topk_bytes for r in rows)):>12} {_fmt_bytes(tot):>12}"
    )
    lines.append(
        "Uncompressed upper bounds (every trial padded to the token limit). Blosc-zstd shrinks sparse "
        "activations several-fold; see the measured ratio in the activations report."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m esr.activations estimate [--trials 2500 --tokens 512 --dtype float16 --topk 64]``."""
    ap = argparse.ArgumentParser(prog="python -m esr.activations", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    est = sub.add_parser("estimate", help="print the store size plan for the paper's five models")
    est.add_argument("--trials", type=int, default=2500, help="trials per model (exp1: ~500 latents x 5)")
    est.add_argument("--tokens", type=int, default=512)
    est.add_argument(
        "--latents",
        type=int,
        default=paper_latent_count(),
        help="dense latents (1 steered + 26 + 25 OTD + 3x26 random + 16 backtracking)",
    )
    est.add_argument("--dtype", default=None, choices=["float16", "float32"], help="default: print both")
    est.add_argument("--topk", type=int, default=64)
    args = ap.parse_args(argv)
    if args.cmd == "estimate":
        for dt in [args.dtype] if args.dtype else ["float16", "float32"]:
            rows = [
                estimate_size(
                    m, d, n_trials=args.trials, n_tokens=args.tokens, n_latents=args.latents, dtype=dt, topk=args.topk
                )
                for m, d in PAPER_MODELS.items()
            ]
            print(format_estimates(rows, dt))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

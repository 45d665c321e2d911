"""Activation store: exact round trip, parallel shards + gather, refusal of incomplete/corrupt stores, chunking."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from esr import activations as A

LATENTS = [7, 3044, 33044, 5]


def make_records(
    prefix: str, n: int, n_lat: int = len(LATENTS), k: int | None = 3, seed: int = 0, lengths: list[int] | None = None
) -> list[A.ActivationRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nt = lengths[i] if lengths else int(rng.integers(3, 9))
        acts = np.where(rng.random((nt, n_lat)) < 0.7, 0.0, rng.random((nt, n_lat)) * 5).astype(np.float16)
        regions = ["off_topic"] * (nt // 2) + ["on_topic"] * (nt - nt // 2)
        kw = {}
        if k:
            kw = dict(topk_indices=rng.integers(0, 65536, (nt, k)), topk_values=rng.random((nt, k)).astype(np.float16))
        out.append(
            A.ActivationRecord(
                f"{prefix}{i:03d}",
                acts,
                [f"w{j} " for j in range(nt)],
                regions,
                steered_latent=100 + i,
                steered_acts=rng.random(nt).astype(np.float16),
                **kw,
            )
        )
    return out


def test_round_trip_exact(tmp_path):
    recs = make_records("t", 5, lengths=[3, 8, 5, 1, 8])
    path = A.write_store(
        tmp_path / "s.zarr",
        recs,
        LATENTS,
        latent_groups={"otd": [7, 33044], "bt": [33044]},
        trials_per_chunk=2,
        provenance={"model": "tiny"},
    )
    ds = A.open_store(path, verify="hash")
    expected = A.build_dataset(
        recs, LATENTS, latent_groups={"otd": [7, 33044], "bt": [33044]}, attrs={"provenance": {"model": "tiny"}}
    )
    xr.testing.assert_identical(ds.load(), expected)
    assert ds.sizes == {"trial": 5, "token": 8, "latent": 4, "topk": 3}
    # per-trial values and padding
    r = recs[2]
    np.testing.assert_array_equal(ds.acts.sel(trial="t002").values[:5], r.acts)
    assert np.isnan(ds.acts.sel(trial="t002").values[5:]).all()
    assert ds.token_text.sel(trial="t002").values.tolist() == [f"w{j} " for j in range(5)] + ["", "", ""]
    assert ds.region.sel(trial="t003").values.tolist()[:2] == ["on_topic", ""]
    assert ds.n_tokens.values.tolist() == [3, 8, 5, 1, 8]
    assert ds.topk_indices.dtype == np.int32 and int(ds.topk_indices.values[0, 5, 0]) == -1
    assert ds.steered_latent.values.tolist() == [100, 101, 102, 103, 104]
    assert ds.attrs["latent_groups"] == {"otd": [7, 33044], "bt": [33044]}
    enc = ds.acts.encoding
    assert enc["chunks"] == (2, 8, 1)
    assert "zstd" in str(enc["compressors"][0].cname) and "shuffle" in str(enc["compressors"][0].shuffle)


def test_record_validation_and_overflow(tmp_path):
    bad = A.ActivationRecord("x", np.zeros((3, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="trial 'x'.*expected"):
        A.build_dataset([bad], LATENTS)
    big = A.ActivationRecord("y", np.full((1, 1), 1e6), ["a"])
    with pytest.raises(ValueError, match="overflow"):
        A.build_dataset([big], [1])
    ds = A.build_dataset([big], [1], dtype="float32")
    assert float(ds.acts[0, 0, 0]) == 1e6
    with pytest.raises(ValueError, match="duplicate"):
        A.build_dataset(make_records("d", 1) * 2, LATENTS)
    with pytest.raises(ValueError, match="not stored"):
        A.build_dataset(make_records("g", 1), LATENTS, latent_groups={"otd": [99]})


def test_record_from_capture():
    cap = np.arange(12, dtype=np.float32).reshape(3, 4)  # columns = latents 9, 7, 100, 5
    r = A.record_from_capture("c", cap, [9, 7, 100, 5], [7, 5], ["a", "b", "c"], steered_latent=100)
    np.testing.assert_array_equal(r.acts, cap[:, [1, 3]])
    np.testing.assert_array_equal(r.steered_acts, cap[:, 2])
    with pytest.raises(ValueError, match="not captured"):
        A.record_from_capture("c", cap, [9, 7, 100, 5], [8], ["a", "b", "c"])


def test_refuses_existing_without_overwrite(tmp_path):
    recs = make_records("t", 2)
    p = A.write_store(tmp_path / "s.zarr", recs, LATENTS)
    with pytest.raises(FileExistsError):
        A.write_store(p, recs, LATENTS)
    A.write_store(p, make_records("u", 3), LATENTS, overwrite=True)
    assert A.open_store(p).sizes["trial"] == 3


def _chunk_files(path: Path, var: str) -> list[Path]:
    return sorted(p for p in (path / var / "c").rglob("*") if p.is_file())


def test_missing_chunk_marker_and_corruption_refused(tmp_path):
    recs = make_records("t", 4)
    p = A.write_store(tmp_path / "s.zarr", recs, LATENTS, trials_per_chunk=2)
    A.open_store(p)
    # a deleted chunk file would silently read back as fill: must be refused
    victim = _chunk_files(p, "acts")[0]
    data = victim.read_bytes()
    victim.unlink()
    with pytest.raises(A.CorruptStoreError, match="missing.*acts/c/"):
        A.open_store(p)
    # truncated chunk
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(A.CorruptStoreError, match="size"):
        A.open_store(p)
    # same size, changed bytes: caught by the hash check only
    victim.write_bytes(bytes(len(data)))
    A.open_store(p, verify="size")
    with pytest.raises(A.CorruptStoreError, match="sha256"):
        A.open_store(p, verify="hash")
    victim.write_bytes(data)
    A.open_store(p, verify="hash")
    # stray file (e.g. a concurrent writer)
    (p / "acts" / "c" / "9").mkdir()
    (p / "acts" / "c" / "9" / "0").write_bytes(b"x")
    with pytest.raises(A.CorruptStoreError, match="not in the manifest"):
        A.open_store(p)
    (p / "acts" / "c" / "9" / "0").unlink()
    # marker removed -> incomplete
    (p / A.MARKER_FILE).unlink()
    with pytest.raises(A.IncompleteStoreError, match="no completion marker"):
        A.open_store(p)
    with pytest.raises(FileNotFoundError):
        A.open_store(tmp_path / "nope.zarr")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    recs = make_records("t", 2)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "_write_marker", boom)
    with pytest.raises(KeyboardInterrupt):
        A.write_store(tmp_path / "s.zarr", recs, LATENTS)
    assert list(tmp_path.iterdir()) == []


def _write_shard(path: str, prefix: str, n: int, seed: int) -> None:
    recs = make_records(prefix, n, seed=seed, lengths=[n + 2] * n)  # shards differ in token length (5 vs 6)
    A.write_store(path, recs, LATENTS, latent_groups={"otd": [7]}, trials_per_chunk=2)


def test_parallel_shards_gather(tmp_path):
    ctx = mp.get_context("spawn")
    specs = [(str(tmp_path / "a.zarr"), "a", 3, 1), (str(tmp_path / "b.zarr"), "b", 4, 2)]
    procs = [ctx.Process(target=_write_shard, args=s) for s in specs]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(120)
        assert pr.exitcode == 0
    out = A.gather_stores([s[0] for s in specs], tmp_path / "all.zarr", trials_per_chunk=2)
    ds = A.open_store(out, verify="hash")
    assert ds.trial.values.tolist() == ["a000", "a001", "a002", "b000", "b001", "b002", "b003"]
    parts = [A.open_store(s[0]).load() for s in specs]
    K = ds.sizes["token"]
    assert K == 6 and np.isnan(ds.acts.sel(trial="a000").values[5]).all()
    for part in parts:
        sub = ds.sel(trial=part.trial.values).load()
        ref = part.reindex(
            token=np.arange(K, dtype=np.int32),
            fill_value={
                "acts": np.nan,
                "steered_acts": np.nan,
                "topk_values": np.nan,
                "topk_indices": -1,
                "token_text": "",
                "region": "",
            },
        )
        for v in (
            "acts",
            "n_tokens",
            "steered_acts",
            "topk_indices",
            "topk_values",
            "token_text",
            "region",
            "steered_latent",
        ):
            np.testing.assert_array_equal(sub[v].values, ref[v].values)
    assert ds.attrs["latent_groups"] == {"otd": [7]}
    assert ds.acts.encoding["chunks"] == (2, K, 1)
    assert len(ds.attrs["gathered_from"]) == 2


def test_gather_refuses_mismatch(tmp_path):
    a = A.write_store(tmp_path / "a.zarr", make_records("a", 2), LATENTS)
    b = A.write_store(tmp_path / "b.zarr", make_records("b", 2, n_lat=3), LATENTS[:3])
    with pytest.raises(ValueError, match="latent coordinate differs"):
        A.gather_stores([a, b], tmp_path / "out.zarr")
    c = A.write_store(tmp_path / "c.zarr", make_records("a", 2), LATENTS)
    with pytest.raises(ValueError, match="trial id 'a000'"):
        A.gather_stores([a, c], tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    (b / A.MARKER_FILE).unlink()
    with pytest.raises(A.IncompleteStoreError):
        A.gather_stores([a, b], tmp_path / "out.zarr")


def test_one_latent_read_touches_only_its_chunks(tmp_path, monkeypatch):
    import zarr.storage

    recs = make_records("t", 10, k=None, lengths=[6] * 10)
    p = A.write_store(tmp_path / "s.zarr", recs, LATENTS, trials_per_chunk=4)
    ds = A.open_store(p)
    keys: list[str] = []
    orig = zarr.storage.LocalStore.get

    async def spy(self, key, *a, **k):
        keys.append(key)
        return await orig(self, key, *a, **k)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy)
    col = ds.acts.sel(latent=33044).values
    acts_keys = sorted(k for k in keys if k.startswith("acts/c/"))
    li = LATENTS.index(33044)
    assert acts_keys == [f"acts/c/{t}/0/{li}" for t in range(3)]  # ceil(10/4) trial chunks, this latent only
    np.testing.assert_array_equal(col, np.stack([r.acts[:, li] for r in recs]))


def test_sharded_store_round_trip(tmp_path):
    recs = make_records("t", 6)
    p = A.write_store(tmp_path / "s.zarr", recs, LATENTS, trials_per_chunk=2, shard_trials=4)
    ds = A.open_store(p, verify="hash")
    assert ds.acts.encoding["shards"] == (4, ds.sizes["token"], len(LATENTS))
    xr.testing.assert_identical(ds.load(), A.build_dataset(recs, LATENTS, attrs={"provenance": {}}))
    assert len(_chunk_files(p, "acts")) == 2


def test_estimate_cli(capsys):
    assert A.paper_latent_count() == 146
    e = A.estimate_size("m", 65536, n_trials=2500, n_tokens=512, n_latents=146, dtype="float16", topk=64)
    assert e.dense_bytes == 2500 * 512 * 146 * 2
    assert e.topk_bytes == 2500 * 512 * 64 * 6
    assert A.main(["estimate", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    for m in A.PAPER_MODELS:
        assert m in out
    assert "712.9 MiB" in out

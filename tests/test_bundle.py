"""Results bundles (esr.bundle): export/import round trip on a synthetic run, manifest checks, what is never shipped.
The end-to-end check on the tiny workflow is tests/test_dag_tiny.py::test_bundle_of_the_tiny_run_recomputes_stats."""

import hashlib
import io
import json
import os
import tarfile

import pytest
import yaml
import zstandard

from esr import bundle
from esr.bundle import BundleError, compare_recorded, export_bundle, import_bundle, verify_placed
from esr.cli import main as cli_main

SECRET = "sk-test-0123456789abcdef"


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.fixture
def run_dir(tmp_path):
    """A synthetic working directory: upstream results, statistics outputs, weights, logs, caches."""
    run = tmp_path / "run"
    _write(run / "results/selection/m/selection.json", {"latents": [1, 2]})
    _write(run / "results/calibration/m/thresholds.parquet", b"PAR1 thresholds")
    _write(run / "results/calibration/m/shard-0.json", {"history": [[1.0, 0.2]]})
    _write(run / "results/exp1/m/shards/steered/gen-0.parquet", b"PAR1 gen")
    _write(run / "results/exp1/m/shards/steered/graded-0.parquet", b"PAR1 graded")
    _write(run / "results/exp1/m/trials.parquet", b"PAR1 trials")
    _write(run / "results/activations/m/exp1.zarr/zarr.json", {"zarr_format": 3})
    _write(run / "results/activations/m/exp1.zarr/acts/c/0/0", os.urandom(4096))
    (run / "results/exp9/m/episodes.zarr").mkdir(parents=True)  # an empty directory output
    _write(run / "results/exp1/m/summary.json", {"cells": [{"cell": "steered", "n": 8}], "provenance": {"x": 1}})
    _write(run / "results/audit/paper_numbers.json", {"rows": [{"id": "a", "ours": 0.5}], "provenance": {"git": {}}})
    _write(run / "results/figures/fig2_esr_by_model.png", b"\x89PNG fake")
    _write(run / "results/sae/m/sae_report.json", {"mse": 0.1})
    _write(run / "results/sae/m/stray.safetensors", b"weights")
    _write(run / "resources/models/m/model.safetensors", b"model weights")
    _write(run / "resources/sae/m/sae_weights.safetensors", b"sae weights")
    _write(run / "resources/labels/m.csv", "latent,label\n1,dog\n")
    _write(run / "resources/prompts/prompts.txt", "how do you bake bread\n")
    _write(run / "resources/judge_cache/ab/cd.json", {"score": 80})
    _write(run / "logs/grade/exp1.log", f"Authorization: Bearer {SECRET}\n")
    config = {
        "run_name": "synthetic",
        "models": {"m": {"source": "hf", "hf_id": "org/m", "sae": {"source": "embedded", "path": "resources/sae/m"}}},
        "judge": {"backend": "fake", "cache_dir": "resources/judge_cache"},
        "cross_judge": {"judges": {"far": {"backend": "fake", "cache_dir": str(tmp_path / "elsewhere")}}},
    }
    _write(run / "config/config.yaml", yaml.safe_dump(config))
    return run


def _members(path):
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar}


def _rewrite(src, dest, members):
    with open(dest, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as zw:
        with tarfile.open(fileobj=zw, mode="w|") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _export(run_dir, tmp_path, env=None):
    out = tmp_path / "out/run.tar.zst"
    manifest = export_bundle(
        run_dir=run_dir, config_path=run_dir / "config/config.yaml", out=out, environ=env or {"ESR_API_KEY": SECRET}
    )
    return out, manifest


def test_round_trip_places_upstream_files_records_statistics_and_stubs_weights(run_dir, tmp_path):
    out, manifest = _export(run_dir, tmp_path)
    shipped = {e["path"]: e for e in manifest["files"]}
    assert "results/calibration/m/shard-0.json" in shipped and "resources/judge_cache/ab/cd.json" in shipped
    assert shipped["results/exp1/m/summary.json"]["role"] == "recorded"
    assert shipped["results/audit/paper_numbers.json"]["role"] == "recorded"
    assert shipped["results/exp1/m/trials.parquet"]["role"] == "upstream"
    store = run_dir / "results/activations/m/exp1.zarr"
    assert manifest["activation_stores"] == {store.relative_to(run_dir).as_posix(): 4096 + len('{"zarr_format": 3}')}
    assert any(x["why"] == "judge cache outside the run directory" for x in manifest["not_shipped"])

    fresh = tmp_path / "clone"
    fresh.mkdir()
    import_bundle(bundle=out, into=fresh, record_metadata=False)
    for rel, e in shipped.items():
        placed = fresh / (f"bundle/recorded/{rel}" if e["role"] == "recorded" else rel)
        assert placed.read_bytes() == (run_dir / rel).read_bytes(), rel
        assert hashlib.sha256(placed.read_bytes()).hexdigest() == e["sha256"]
    assert (fresh / "results/exp9/m/episodes.zarr").is_dir()
    assert not (fresh / "results/exp1/m/summary.json").exists()  # recomputed by Snakemake, not placed
    assert (fresh / "bundle/config.yaml").read_text() == (run_dir / "config/config.yaml").read_text()
    stub = fresh / "resources/models/m"
    assert json.loads((stub / bundle.STUB_MARKER).read_text())["stub"] is True
    assert (fresh / "resources/sae/m" / bundle.STUB_MARKER).is_file()
    assert verify_placed(root=fresh) == []
    # mtimes in DAG order: stub < selection < calibration shard < thresholds < gen < graded < trials
    order = [
        "resources/models/m",
        "results/selection/m/selection.json",
        "results/calibration/m/shard-0.json",
        "results/calibration/m/thresholds.parquet",
        "results/exp1/m/shards/steered/gen-0.parquet",
        "results/exp1/m/shards/steered/graded-0.parquet",
        "results/exp1/m/trials.parquet",
    ]
    times = [(fresh / p).stat().st_mtime for p in order]
    assert times == sorted(times) and len(set(times)) == len(times)

    # a second import into the same directory is refused (files in the way), with --force it is allowed
    with pytest.raises(BundleError, match="already exist"):
        import_bundle(bundle=out, into=fresh, record_metadata=False)
    import_bundle(bundle=out, into=fresh, record_metadata=False, force=True)


def test_weights_logs_and_secrets_are_never_shipped(run_dir, tmp_path):
    out, manifest = _export(run_dir, tmp_path)
    members = _members(out)
    assert not [n for n in members if n.endswith(".safetensors") or n.startswith(("logs/", "resources/models"))]
    assert all(SECRET.encode() not in data for data in members.values())
    left_out = {x["path"]: x["why"] for x in manifest["not_shipped"]}
    assert left_out["results/sae/m/stray.safetensors"] == "weights file"
    assert left_out["resources/models"] == left_out["logs"] == "excluded folder"
    assert next(x for x in manifest["not_shipped"] if x["path"] == "resources/sae")["bytes"] == len(b"sae weights")

    # a secret value in a shipped file stops the export, naming the file and the variable, never the value
    _write(run_dir / "results/judge/m/anchors.json", {"note": f"key={SECRET}"})
    with pytest.raises(BundleError) as err:
        _export(run_dir, tmp_path)
    assert "results/judge/m/anchors.json" in str(err.value) and "$ESR_API_KEY" in str(err.value)
    assert SECRET not in str(err.value)


def test_a_tampered_file_fails_import_naming_it_and_both_hashes(run_dir, tmp_path):
    out, manifest = _export(run_dir, tmp_path)
    members = _members(out)
    rel = "results/exp1/m/trials.parquet"
    members[rel] = b"PAR1 edited trials"
    bad = tmp_path / "tampered.tar.zst"
    _rewrite(out, bad, members)
    want = next(e["sha256"] for e in manifest["files"] if e["path"] == rel)
    got = hashlib.sha256(members[rel]).hexdigest()
    fresh = tmp_path / "clone"
    fresh.mkdir()
    with pytest.raises(BundleError) as err:
        import_bundle(bundle=bad, into=fresh, record_metadata=False)
    assert rel in str(err.value) and want in str(err.value) and got in str(err.value)
    assert not (fresh / "results").exists()  # nothing placed


def test_a_truncated_bundle_fails_import_naming_a_file_and_its_hash(run_dir, tmp_path):
    for k in range(4):  # several zstd blocks, so that a cut lands inside a file
        _write(run_dir / f"results/exp1/m/shards/steered/acts-0.zarr/c/{k}", os.urandom(200_000))
    out, manifest = _export(run_dir, tmp_path)
    data = out.read_bytes()
    bad = tmp_path / "truncated.tar.zst"
    bad.write_bytes(data[: int(len(data) * 0.7)])
    fresh = tmp_path / "clone"
    fresh.mkdir()
    with pytest.raises(BundleError) as err:
        import_bundle(bundle=bad, into=fresh, record_metadata=False)
    msg = str(err.value)
    named = [e for e in manifest["files"] if e["path"] in msg]
    assert named and any(e["sha256"] in msg for e in named), msg
    assert not (fresh / "results").exists()
    # the CLI reports it as an error (exit 2)
    assert cli_main(["bundle", "import", str(bad), "--into", str(fresh), "--no-metadata"]) == 2


def test_compare_recorded_flags_a_changed_number_and_ignores_provenance(run_dir, tmp_path):
    out, _ = _export(run_dir, tmp_path)
    fresh = tmp_path / "clone"
    fresh.mkdir()
    assert cli_main(["bundle", "import", str(out), "--into", str(fresh), "--no-metadata"]) == 0
    summary = "results/exp1/m/summary.json"
    _write(fresh / summary, {"cells": [{"cell": "steered", "n": 8}], "provenance": {"x": 2}})
    assert compare_recorded(root=fresh, paths=[summary]) == []
    _write(fresh / summary, {"cells": [{"cell": "steered", "n": 9}], "provenance": {"x": 2}})
    assert compare_recorded(root=fresh, paths=[summary]) == [
        {"path": summary, "key": "cells[steered].n", "recorded": 8, "recomputed": 9}
    ]
    (fresh / "bundle/recorded" / summary).write_text("{}")  # an edited placed file: verify names it
    problems = verify_placed(root=fresh)
    assert len(problems) == 1 and problems[0].startswith(summary)


def test_preflight_accepts_an_imported_bundle_without_models(tmp_path):
    from esr.preflight import InputError, check_inputs

    config = {
        "prompts": {"source": "file", "path": "missing_prompts.txt"},
        "models": {"m": {"source": "local", "path": "missing_model", "sae": {"source": "local", "path": "no_sae"}}},
    }
    with pytest.raises(InputError):
        check_inputs(config, root=tmp_path)
    _write(tmp_path / bundle.MANIFEST, {"format": bundle.FORMAT})
    check_inputs(config, root=tmp_path)


def test_cli_export_import_verify(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ESR_API_KEY", raising=False)
    out = tmp_path / "cli.tar.zst"
    assert cli_main(["bundle", "export", str(run_dir), str(out), "--level", "3"]) == 0  # config/config.yaml default
    assert "activation store results/activations/m/exp1.zarr" in capsys.readouterr().out
    fresh = tmp_path / "clone"
    fresh.mkdir()
    assert cli_main(["bundle", "import", str(out), "--into", str(fresh), "--no-metadata"]) == 0
    assert cli_main(["bundle", "verify", str(fresh)]) == 0
    (fresh / "results/exp1/m/trials.parquet").write_bytes(b"PAR1 edited")
    assert cli_main(["bundle", "verify", str(fresh)]) == 1
    assert "results/exp1/m/trials.parquet: manifest sha256" in capsys.readouterr().err


def test_import_without_a_snakefile_stops_before_unpacking(tmp_path, monkeypatch):
    """An installed package outside a clone has no Snakefile to record grading metadata with: a clear error naming
    where it looked and the options, before anything is unpacked; a Snakefile in the target clone is found."""
    import esr.config
    from esr.bundle import default_snakefile

    monkeypatch.setattr(esr.config, "CHECKOUT_ROOT", None)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(BundleError, match="no Snakefile.*--snakefile.*--no-metadata"):
        import_bundle(bundle=tmp_path / "missing.tar.gz", into=fresh)
    assert list(fresh.iterdir()) == []
    with pytest.raises(BundleError, match="does not exist"):
        import_bundle(bundle=tmp_path / "missing.tar.gz", into=fresh, snakefile=tmp_path / "nope")
    (fresh / "Snakefile").write_text("# workflow\n")
    assert default_snakefile(fresh) == fresh / "Snakefile"

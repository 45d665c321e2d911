"""Label download: a real HTTP server on loopback serves a fake Neuronpedia export and a labels CSV."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from esr.config import SAESpec, model_specs, validate_config
from esr.fidelity import fidelity_table
from esr.io import read_json
from esr.labels import (
    LabelsError,
    fetch_csv_labels,
    fetch_labels,
    fetch_neuronpedia_labels,
    label_counts,
    neuronpedia_ids_for_sae,
    resolve_neuronpedia_ids,
)
from esr.latents import read_labels

MODEL, LAYER = "gemma-2-2b", "16-gemmascope-res-16k"
GEMMA_2B_SAE = SAESpec(
    source="sae_lens",
    boost_unit="raw",
    release="gemma-scope-2b-pt-res-canonical",
    sae_id="layer_16/width_16k/canonical",
)
PREFIX = f"/v1/{MODEL}/{LAYER}/explanations"


def _batch(records: list[dict]) -> bytes:
    return gzip.compress("\n".join(json.dumps(r) for r in records).encode() + b"\n", mtime=0)


def _rec(index, description, **kw):
    return {
        "modelId": MODEL,
        "layer": LAYER,
        "index": index,
        "description": description,
        "explanationModelName": kw.pop("model", "gpt-4o-mini"),
        "typeName": "oai_token-act-pair",
        **kw,
    }


BATCH0 = _batch(
    [
        _rec("0", " references to cats "),
        _rec("1", ""),
        _rec("2", "legal documents"),
        _rec("2", "law texts", model="claude"),
    ]
)  # latent 2 has two explanations
BATCH1 = _batch([_rec(3, "Python code"), _rec("4", None), _rec("5", "sports\nteams"), _rec("1", "")])


class _Server:
    """Serves ``files`` (path -> bytes); ``fail`` maps a path to a list of status codes returned (one per request)
    before the file is served. Logs every request path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, list[int]] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                codes = outer.fail.get(self.path)
                if codes:
                    code = codes.pop(0)
                    self.send_response(code)
                    self.end_headers()
                    return
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    s.files[f"{PREFIX}/batch-0.jsonl.gz"] = BATCH0
    s.files[f"{PREFIX}/batch-1.jsonl.gz"] = BATCH1
    yield s
    s.close()


def _fetch(server, out: Path, **kw):
    kw.setdefault("retries", 0)
    kw.setdefault("backoff_s", 0.0)
    kw.setdefault("timeout", 5.0)
    return fetch_neuronpedia_labels(MODEL, LAYER, out, base_url=server.base + "/v1", **kw)


def test_neuronpedia_two_batches_then_404(server, tmp_path):
    out, man = tmp_path / "labels" / "gemma.csv", tmp_path / "labels" / "gemma.manifest.json"
    manifest = _fetch(server, out, manifest_json=man, d_sae=8)
    # batch-2 was asked for once (404 = end of export), nothing after it
    assert server.requests == [f"{PREFIX}/batch-{i}.jsonl.gz" for i in range(3)]
    df = read_labels(out)  # readable by the selection code
    assert df["latent"].tolist() == [0, 1, 2, 3, 4, 5]
    labels = dict(zip(df["latent"], df["label"]))
    assert labels[0] == "references to cats" and labels[5] == "sports teams"
    assert labels[1] is None and labels[4] is None
    assert labels[2] == "legal documents"  # first non-empty explanation wins
    raw = pd.read_csv(out, keep_default_na=False)
    assert raw.set_index("latent").loc[2, "n_explanations"] == 2
    assert raw.set_index("latent").loc[1, "n_explanations"] == 2

    on_disk = read_json(man)
    assert on_disk["files"] == manifest["files"]
    assert [f["sha256"] for f in on_disk["files"]] == [hashlib.sha256(b).hexdigest() for b in (BATCH0, BATCH1)]
    assert [f["size_bytes"] for f in on_disk["files"]] == [len(BATCH0), len(BATCH1)]
    assert [f["n_records"] for f in on_disk["files"]] == [4, 4]
    assert on_disk["files"][0]["url"] == f"{server.base}{PREFIX}/batch-0.jsonl.gz"
    c = on_disk["counts"]
    assert (c["n_records"], c["n_latents"], c["n_labelled"], c["n_empty"]) == (8, 6, 4, 2)
    assert (c["n_duplicate_records"], c["n_conflicting_latents"]) == (2, 1)
    lc = on_disk["label_counts"]
    assert (lc["labelled"], lc["empty"], lc["missing"], lc["unlabeled"]) == (4, 2, 2, 4)
    assert on_disk["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert "provenance" in on_disk
    assert not list(out.parent.glob(".*"))  # cache and temporaries removed


def test_neuronpedia_fixed_batch_count(server, tmp_path):
    out = tmp_path / "a.csv"
    m = _fetch(server, out, n_batches=1)
    assert server.requests == [f"{PREFIX}/batch-0.jsonl.gz"]
    assert m["counts"]["n_latents"] == 3
    with pytest.raises(LabelsError, match="batch 2 of 3 missing"):
        _fetch(server, tmp_path / "b.csv", n_batches=3)
    assert not (tmp_path / "b.csv").exists()


def test_neuronpedia_nothing_there(server, tmp_path):
    with pytest.raises(LabelsError, match="no explanation batches"):
        fetch_neuronpedia_labels(MODEL, "99-nope", tmp_path / "x.csv", base_url=server.base + "/v1", retries=0)
    server.fail[f"{PREFIX}/batch-0.jsonl.gz"] = [403]  # S3's answer for a missing key
    with pytest.raises(LabelsError, match="HTTP 403"):
        _fetch(server, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_neuronpedia_retries_transient_errors(server, tmp_path):
    server.fail[f"{PREFIX}/batch-1.jsonl.gz"] = [503, 500]
    m = _fetch(server, tmp_path / "a.csv", retries=2)
    assert m["counts"]["n_latents"] == 6
    assert server.requests.count(f"{PREFIX}/batch-1.jsonl.gz") == 3


def test_failure_leaves_no_output_and_resume_reuses_cache(server, tmp_path):
    out, man = tmp_path / "gemma.csv", tmp_path / "gemma.manifest.json"
    out.write_text("old,content\n")  # an existing output is untouched by a failed run
    server.fail[f"{PREFIX}/batch-1.jsonl.gz"] = [500, 500]
    with pytest.raises(LabelsError, match="after 2 attempt"):
        _fetch(server, out, manifest_json=man, retries=1)
    assert out.read_text() == "old,content\n" and not man.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("gemma.csv",)]
    assert leftovers == [".gemma.csv.download"]  # only the resume cache, no temporary CSV/JSON
    assert sorted(p.name for p in (tmp_path / ".gemma.csv.download").iterdir()) == ["batch-0.jsonl.gz"]

    out.unlink()
    server.requests.clear()
    m = _fetch(server, out, manifest_json=man)
    assert f"{PREFIX}/batch-0.jsonl.gz" not in server.requests  # resumed from the cache
    assert [f["cached"] for f in m["files"]] == [True, False]
    assert m["files"][0]["sha256"] == hashlib.sha256(BATCH0).hexdigest()
    assert read_labels(out).shape[0] == 6
    assert not (tmp_path / ".gemma.csv.download").exists()


def test_bad_records_are_errors(server, tmp_path):
    server.files[f"{PREFIX}/batch-1.jsonl.gz"] = _batch(
        [{"modelId": MODEL, "layer": "20-other", "index": 1, "description": "x"}]
    )
    with pytest.raises(LabelsError, match="another model/source"):
        _fetch(server, tmp_path / "a.csv")
    server.files[f"{PREFIX}/batch-1.jsonl.gz"] = _batch([{"description": "no index"}])
    with pytest.raises(LabelsError, match="batch-1.jsonl.gz line 1: no integer latent index"):
        _fetch(server, tmp_path / "b.csv")
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()


def test_expected_batch_hash(server, tmp_path):
    good = hashlib.sha256(BATCH0).hexdigest()
    _fetch(server, tmp_path / "a.csv", expected_sha256={"batch-0.jsonl.gz": good})
    with pytest.raises(LabelsError, match=f"has sha256 {good}, expected {'0' * 64}"):
        _fetch(server, tmp_path / "b.csv", expected_sha256={"batch-0.jsonl.gz": "0" * 64})
    assert not (tmp_path / "b.csv").exists()


GOODFIRE = (
    b"index_in_sae,label,frequency\n2,Formal legal language,0.01\n0,  The assistant apologises ,0.2\n1,,0\n"
    b"3,feature_3,0\n2,duplicate text,0.01\n"
)


def test_csv_labels_file_url_and_hash(tmp_path):
    src = tmp_path / "goodfire.csv"
    src.write_bytes(GOODFIRE)
    digest = hashlib.sha256(GOODFIRE).hexdigest()
    out, man = tmp_path / "out" / "llama.csv", tmp_path / "out" / "llama.manifest.json"
    m = fetch_csv_labels(src.as_uri(), out, manifest_json=man, d_sae=6, source="goodfire")  # no hash: recorded
    assert m["files"][0]["sha256"] == digest and m["files"][0]["sha256_verified"] is False
    assert read_json(man)["files"][0]["sha256"] == digest
    raw = pd.read_csv(out, keep_default_na=False)
    assert list(raw.columns) == ["latent", "label", "frequency"]
    assert raw["latent"].tolist() == [0, 1, 2, 3]
    assert raw["label"].tolist() == ["The assistant apologises", "", "Formal legal language", "feature_3"]
    c, lc = m["counts"], m["label_counts"]
    assert (c["n_records"], c["n_latents"], c["n_labelled"], c["n_empty"], c["n_duplicate_records"]) == (5, 4, 2, 2, 1)
    assert (lc["labelled"], lc["empty"], lc["missing"], lc["unlabeled"]) == (2, 2, 2, 4)
    assert read_labels(out)["label"].tolist() == ["The assistant apologises", None, "Formal legal language", None]

    # verified hash, plain local path
    m2 = fetch_csv_labels(str(src), tmp_path / "b.csv", sha256=digest)
    assert m2["files"][0]["sha256_verified"] is True

    # mismatch: a clear error naming both hashes, nothing written
    with pytest.raises(LabelsError, match=f"sha256 {digest}, expected {'a' * 64}"):
        fetch_csv_labels(src.as_uri(), tmp_path / "c.csv", sha256="a" * 64)
    assert not (tmp_path / "c.csv").exists() and not list(tmp_path.glob(".c.csv*"))

    with pytest.raises(LabelsError, match="not found"):
        fetch_csv_labels((tmp_path / "nope.csv").as_uri(), tmp_path / "d.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,x\n")
    with pytest.raises(LabelsError, match="needs a latent column"):
        fetch_csv_labels(str(bad), tmp_path / "e.csv")


def test_csv_labels_over_http(server, tmp_path):
    server.files["/goodfire.csv"] = GOODFIRE
    m = fetch_csv_labels(server.base + "/goodfire.csv", tmp_path / "x.csv", retries=0)
    assert m["files"][0]["url"].endswith("/goodfire.csv") and m["counts"]["n_latents"] == 4


def test_label_counts():
    df = pd.DataFrame({"latent": [0, 1, 2, 2, 9, 4], "label": ["a", "", "feature_2", "b", "c", None]})
    assert label_counts(df, 6) == {
        "d_sae": 6,
        "rows": 6,
        "labelled": 1,
        "empty": 3,
        "missing": 2,
        "unlabeled": 5,
        "out_of_range": 1,
        "duplicate_rows": 1,
    }
    df2 = df.rename(columns={"latent": "index_in_sae"})
    c = label_counts(df2, None)
    assert (c["labelled"], c["empty"], c["missing"], c["unlabeled"], c["out_of_range"]) == (2, 3, None, None, 0)


def test_stage_dispatch(server, tmp_path):
    out, man = tmp_path / "l.csv", tmp_path / "l.manifest.json"
    with pytest.raises(LabelsError, match="nothing to download"):
        fetch_labels({"source": "auto"}, "smollm2", out, man)
    with pytest.raises(LabelsError, match="did not publish"):
        fetch_labels({"source": "goodfire"}, "llama-3.1-8b", out, man)
    with pytest.raises(LabelsError, match=r"models\.mystery\.labels\.neuronpedia_model and .*no sae-lens release"):
        fetch_labels({"source": "neuronpedia"}, "mystery", out, man)
    with pytest.raises(LabelsError, match="must be one of"):
        fetch_labels({"source": "magic"}, "x", out, man)
    assert not out.exists() and not man.exists()

    # neuronpedia: default ids from sae-lens's directory for the model's SAE, base URL from labels.url
    m = fetch_labels(
        {"source": "neuronpedia", "url": server.base + "/v1", "retries": 0},
        "gemma-2-2b",
        out,
        man,
        d_sae=16384,
        sae=GEMMA_2B_SAE,
    )
    assert m["neuronpedia_layer_id"] == LAYER and read_json(man)["label_counts"]["missing"] == 16384 - 6
    assert read_json(man)["neuronpedia_ids_from"].startswith("sae-lens directory")
    assert read_json(man)["goodfire_sae_with_neuronpedia_labels"] is False

    src = tmp_path / "g.csv"
    src.write_bytes(GOODFIRE)
    m = fetch_labels(
        {"source": "file", "path": str(src), "sha256": hashlib.sha256(GOODFIRE).hexdigest()}, "llama-3.1-8b", out, man
    )
    assert m["source"] == "file" and read_json(man)["files"][0]["sha256_verified"] is True


# ---------------------------------------------------------------------------------------------------------------
# Neuronpedia ids from sae-lens's directory; the Goodfire SAEs' Neuronpedia labels (issue 12)

#: Neuronpedia's (model, source) ids of the paper's SAEs, as listed on neuronpedia.org and in sae-lens's
#: pretrained_saes.yaml (reference protocol §1.1 / §2 step 1 for the Gemma ids).
PAPER_NEURONPEDIA_IDS = {
    "llama-3.3-70b": ("llama3.3-70b-it", "50-resid-post-gf"),
    "llama-3.1-8b": ("llama3.1-8b-it", "19-resid-post-gf"),
    "gemma-2-2b": ("gemma-2-2b", "16-gemmascope-res-16k"),
    "gemma-2-9b": ("gemma-2-9b", "26-gemmascope-res-16k"),
    "gemma-2-27b": ("gemma-2-27b", "22-gemmascope-res-131k"),
}


@pytest.fixture(scope="module")
def paper_config(repo_root):
    import yaml

    return validate_config(yaml.safe_load((repo_root / "config/paper.yaml").read_text()))


def test_paper_models_take_neuronpedia_ids_from_the_sae_lens_directory(paper_config):
    specs = model_specs(paper_config)
    assert set(specs) == set(PAPER_NEURONPEDIA_IDS)
    for name, spec in specs.items():
        labels = paper_config["models"][name]["labels"]
        assert labels["source"] == "neuronpedia", name
        assert "neuronpedia_model" not in labels and "neuronpedia_layer_id" not in labels, name  # not hard-coded
        np_model, np_layer, origin = resolve_neuronpedia_ids(labels=labels, sae=spec.sae, model_name=name)
        assert (np_model, np_layer) == PAPER_NEURONPEDIA_IDS[name], name
        assert origin == f"sae-lens directory ({spec.sae.release}/{spec.sae.sae_id})"
    # the config mapping works as well as the SAESpec
    sae_cfg = paper_config["models"]["llama-3.3-70b"]["sae"]
    assert (
        neuronpedia_ids_for_sae(release=sae_cfg["release"], sae_id=sae_cfg["sae_id"])
        == PAPER_NEURONPEDIA_IDS["llama-3.3-70b"]
    )


def test_config_ids_override_the_directory_and_missing_ids_name_the_key():
    labels = {"source": "neuronpedia", "neuronpedia_layer_id": "16-res-custom"}
    assert resolve_neuronpedia_ids(labels=labels, sae=GEMMA_2B_SAE, model_name="g") == (
        "gemma-2-2b",
        "16-res-custom",
        f"config + sae-lens directory ({GEMMA_2B_SAE.release}/{GEMMA_2B_SAE.sae_id})",
    )
    both = {**labels, "neuronpedia_model": "my-model"}
    assert resolve_neuronpedia_ids(labels=both, sae=None, model_name="g") == ("my-model", "16-res-custom", "config")
    assert neuronpedia_ids_for_sae(release="no-such-release", sae_id="layer_0") is None
    assert neuronpedia_ids_for_sae(release=GEMMA_2B_SAE.release, sae_id="layer_99/width_1k/none") is None
    unknown = SAESpec(source="sae_lens", boost_unit="raw", release="no-such-release", sae_id="layer_0")
    with pytest.raises(LabelsError, match=r"models\.x\.labels\.neuronpedia_model .*'no-such-release'"):
        resolve_neuronpedia_ids(labels={"source": "neuronpedia"}, sae=unknown, model_name="x")


LLAMA_8B_SAE = SAESpec(source="sae_lens", boost_unit="raw", release="goodfire-llama-3.1-8b-instruct", sae_id="layer_19")
LLAMA_PREFIX = "/v1/llama3.1-8b-it/19-resid-post-gf/explanations"


def _llama_batch(records):
    return _batch([{**r, "modelId": "llama3.1-8b-it", "layer": "19-resid-post-gf"} for r in records])


def test_goodfire_sae_export_over_loopback_records_and_checks_batch_hashes(server, tmp_path, paper_config):
    batch0 = _llama_batch([{"index": "0", "description": "apologies"}, {"index": "7", "description": "recipes"}])
    server.files[f"{LLAMA_PREFIX}/batch-0.jsonl.gz"] = batch0
    labels = {"source": "neuronpedia", "url": server.base + "/v1", "retries": 0}
    out, man = tmp_path / "llama.csv", tmp_path / "llama.manifest.json"

    # first download, through the rule's stage (the SAE spec comes from the model spec): the hash is recorded
    from esr.stages.sae import download_labels

    sae_manifest = tmp_path / "sae_manifest.json"
    sae_manifest.write_text(json.dumps({"d_sae": 65536}))
    spec = model_specs(paper_config)["llama-3.1-8b"]
    assert spec.sae == LLAMA_8B_SAE
    download_labels(
        labels=labels, spec=spec, model="llama-3.1-8b", sae_manifest=str(sae_manifest), csv=str(out), manifest=str(man)
    )
    recorded = m = read_json(man)
    assert recorded["label_counts"]["missing"] == 65536 - 2
    assert server.requests[0] == f"{LLAMA_PREFIX}/batch-0.jsonl.gz"
    assert [f["sha256"] for f in recorded["files"]] == [hashlib.sha256(batch0).hexdigest()]
    assert (recorded["neuronpedia_model"], recorded["neuronpedia_layer_id"]) == ("llama3.1-8b-it", "19-resid-post-gf")
    assert recorded["goodfire_sae_with_neuronpedia_labels"] is True
    assert "not the Goodfire labels the authors used" in recorded["note"]
    assert read_labels(out)["label"].tolist() == ["apologies", "recipes"] and m["batch_sha256_checked"] == []

    # the recorded hash, pinned in config (labels.batch_sha256), is checked on the next download
    pinned = {**labels, "batch_sha256": {"batch-0.jsonl.gz": recorded["files"][0]["sha256"]}}
    out2, man2 = tmp_path / "pinned.csv", tmp_path / "pinned.manifest.json"
    m2 = fetch_labels(pinned, "llama-3.1-8b", out2, man2, sae=LLAMA_8B_SAE)
    assert m2["batch_sha256_checked"] == ["batch-0.jsonl.gz"] and out2.read_bytes() == out.read_bytes()

    # the export changed upstream: a mismatch is an error naming both hashes, and nothing is written
    server.files[f"{LLAMA_PREFIX}/batch-0.jsonl.gz"] = _llama_batch([{"index": "0", "description": "changed"}])
    out3, man3 = tmp_path / "changed.csv", tmp_path / "changed.manifest.json"
    with pytest.raises(LabelsError, match=f"expected {recorded['files'][0]['sha256']}"):
        fetch_labels(pinned, "llama-3.1-8b", out3, man3, sae=LLAMA_8B_SAE)
    assert not out3.exists() and not man3.exists()
    assert not list(tmp_path.glob(".changed.csv.download/*"))  # the bad batch is not kept for a resume


def test_fidelity_states_neuronpedia_labels_of_goodfire_saes(paper_config):
    import copy

    rows = [r for r in fidelity_table(paper_config) if r["setting"].endswith(".labels.source")]
    assert sorted(r["setting"] for r in rows) == [
        "models.llama-3.1-8b.labels.source",
        "models.llama-3.3-70b.labels.source",
    ]
    for r in rows:
        assert (
            "Neuronpedia's auto-explanations" in r["note"] and "not the Goodfire labels the authors used" in r["note"]
        )
        assert r["matches_reference"] is False and "goodfire-llama" in r["this_run"]
    cfg = copy.deepcopy(paper_config)  # with the authors' Goodfire CSV supplied, the line goes away
    cfg["models"]["llama-3.1-8b"]["labels"] = {"source": "goodfire", "url": "file:///labels.csv"}
    settings = [r["setting"] for r in fidelity_table(cfg) if r["setting"].endswith(".labels.source")]
    assert settings == ["models.llama-3.3-70b.labels.source"]

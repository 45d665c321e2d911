"""The paper rehearsal's assets (esr.rehearsal): the offline hub cache of the five paper models and their SAEs, the
loopback prompt/label files, the override file, and the loopback judge answering every judge use of the paper
config. Hub-cache checks run in subprocesses: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from esr.detectors import PAPER_SETS
from esr.rehearsal import (
    D_SAE,
    HIDDEN,
    JUDGE_KEY_ENV,
    N_PROMPTS,
    build_rehearsal_assets,
    sae_width,
    serve_files,
    write_override,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "paper.yaml"
LAYERS = {"llama-3.3-70b": 80, "llama-3.1-8b": 32, "gemma-2-2b": 26, "gemma-2-9b": 42, "gemma-2-27b": 46}
LOOPBACK = re.compile(r"^http://127\.0\.0\.1:\d+(/|$)")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from judge_server import ScriptedServer

    root = tmp_path_factory.mktemp("rehearsal")
    assets = build_rehearsal_assets(root)
    judge = ScriptedServer().start()
    with serve_files(assets.files_dir) as files_url:
        override = write_override(root, files_url=files_url, judge_url=judge.root, assets=assets)
        yield {"root": root, "assets": assets, "override": override, "files_url": files_url, "judge": judge}
    judge.stop()


@pytest.fixture(scope="module")
def merged(rehearsal):
    from esr.config import load_config

    return load_config(PAPER, overrides=yaml.safe_load(rehearsal["override"].read_text()))


def _env(assets, **extra) -> dict[str, str]:
    env = {**os.environ, **assets.env(), **extra}
    env.setdefault("DS_ACCELERATOR", "cpu")
    return {k: v for k, v in env.items() if v is not None}


def _run_py(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


_MODEL_CHECK = r"""
import json, sys, torch, yaml
from huggingface_hub import snapshot_download
from esr.config import ModelSpec
from esr.models import load_model_dir
from esr.generation import encode_prompt
from esr.sae import load_sae
from esr.stages.assets import download_model
from esr.stages.sae import fetch_sae

paper = yaml.safe_load(open(sys.argv[1]))
out = {}
for name, m in paper["models"].items():
    snap = snapshot_download(m["hf_id"], revision=m["revision"])
    cfg = json.load(open(f"{snap}/config.json"))
    spec = ModelSpec.from_config(name, m)
    download_model(spec=spec, model_dir=f"models/{name}")  # the download rule's body
    lm = load_model_dir(f"models/{name}", dtype=spec.dtype, family=spec.family)
    ids = torch.tensor([encode_prompt(lm.tokenizer, "how do you bake bread", spec.chat_template)])
    seen = {}
    def rec(key):
        return lambda mod, args, output: seen.__setitem__(key, output[0] if isinstance(output, tuple) else output)
    hooks = [lm.layers[spec.injection_layer].register_forward_hook(rec("inj")),
             lm.layers[spec.sae_layer].register_forward_hook(rec("sae"))]
    with torch.no_grad():
        logits = lm.model(ids).logits
    for h in hooks:
        h.remove()
    sae = load_sae(spec.sae, dtype="float32")
    acts = sae.encode(seen["sae"].float())
    fetch_sae(spec=spec, manifest=f"sae_{name}.json")
    out[name] = {
        "snapshot": snap, "architectures": cfg["architectures"], "num_hidden_layers": cfg["num_hidden_layers"],
        "n_layers": lm.n_layers, "d_model": lm.d_model, "inj_shape": list(seen["inj"].shape),
        "logits_finite": bool(torch.isfinite(logits).all()), "prompt": lm.tokenizer.decode(ids[0]),
        "sae_d_in": sae.cfg.d_in, "sae_d_sae": sae.cfg.d_sae, "hook": sae.cfg.metadata.hook_name,
        "arch": sae.cfg.architecture(), "acts_shape": list(acts.shape),
        "dec_norm_mean": float(sae.W_dec.norm(dim=1).mean()), "fetch_manifest": json.load(open(f"sae_{name}.json")),
    }
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def model_checks(rehearsal, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("models")
    proc = subprocess.run(
        [sys.executable, "-c", _MODEL_CHECK, str(PAPER)],
        env=_env(rehearsal["assets"]),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_build_is_small_and_uses_the_real_cache_layout(rehearsal):
    assets = rehearsal["assets"]
    hub = assets.hf_home / "hub"
    paper = yaml.safe_load(PAPER.read_text())
    for m in paper["models"].values():
        repo = hub / f"models--{m['hf_id'].replace('/', '--')}"
        assert (repo / "refs" / "main").read_text() == m["revision"]
        snap = repo / "snapshots" / m["revision"]
        weights = snap / "model.safetensors"
        assert weights.is_symlink() and weights.resolve().parent == (repo / "blobs").resolve()
        assert "chat_template" in json.loads((snap / "tokenizer_config.json").read_text())
    size = sum(p.stat().st_size for p in hub.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 50e6, size


def test_models_resolve_offline_with_real_architectures_and_layers(model_checks):
    paper = yaml.safe_load(PAPER.read_text())
    assert set(model_checks) == set(LAYERS)
    for name, got in model_checks.items():
        m = paper["models"][name]
        assert got["snapshot"].endswith(f"/snapshots/{m['revision']}")
        arch = "LlamaForCausalLM" if m["family"] == "llama" else "Gemma2ForCausalLM"
        assert got["architectures"] == [arch]
        assert got["num_hidden_layers"] == got["n_layers"] == LAYERS[name] == m["n_layers"]
        assert got["d_model"] == HIDDEN and got["inj_shape"][-1] == HIDDEN and got["logits_finite"]
        turn = "<|start_header_id|>" if m["family"] == "llama" else "<start_of_turn>"
        assert turn in got["prompt"] and "bake bread" in got["prompt"]


def test_saes_load_through_sae_lens_with_the_paper_hook_layer(model_checks):
    paper = yaml.safe_load(PAPER.read_text())
    for name, got in model_checks.items():
        m = paper["models"][name]
        width = sae_width(m)  # the 70B's fake SAE is as wide as the real one: the paper's detector sets index it
        assert width == (65536 if m.get("paper_detector_sets") else D_SAE), name
        paper_ids = [i for s in m.get("paper_detector_sets") or () for i in PAPER_SETS[s]]
        assert all(i < width for i in paper_ids)
        assert got["sae_d_in"] == got["d_model"] and got["sae_d_sae"] == width
        assert got["hook"] == f"blocks.{m['sae_layer']}.hook_resid_post"
        assert got["acts_shape"][-1] == width
        goodfire = m["sae"]["release"].startswith("goodfire")
        assert got["arch"] == ("standard" if goodfire else "jumprelu")
        # GemmaScope decoder rows are unit norm, Goodfire's are not (the boost units in config/paper.yaml)
        assert (abs(got["dec_norm_mean"] - 1.0) > 0.5) if goodfire else got["dec_norm_mean"] == pytest.approx(1.0)
        assert got["fetch_manifest"]["hook_name"] == got["hook"] and got["fetch_manifest"]["d_sae"] == width


def test_sae_lens_needs_the_directory_hook_and_offline_refuses_other_revisions(rehearsal, tmp_path):
    code = r"""
import sys
from huggingface_hub import snapshot_download
from sae_lens import SAE
try:
    SAE.from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_16/width_16k/canonical")
    print("LOADED")
except Exception as e:
    print("SAE_ERROR", type(e).__name__, str(e)[:200])
try:
    snapshot_download("google/gemma-2-2b-it", revision="0" * 40)
    print("RESOLVED")
except Exception as e:
    print("HUB_ERROR", type(e).__name__)
"""
    proc = _run_py(code, _env(rehearsal["assets"], ESR_REHEARSAL_SAE_OVERRIDES=None), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # sae-lens's gemma_2 converter hard-codes d_in 2304 / d_sae 16384: without the hook the tiny file cannot load
    assert "SAE_ERROR" in proc.stdout and "size mismatch" in proc.stdout, proc.stdout
    assert "HUB_ERROR" in proc.stdout and "RESOLVED" not in proc.stdout


def test_prompts_and_labels_fetch_from_loopback_with_sha256(rehearsal, merged, tmp_path):
    from esr.assets import AssetError, fetch_prompts, read_prompts
    from esr.labels import LabelsError, fetch_labels

    p = merged["prompts"]
    assert LOOPBACK.match(p["url"])
    out = fetch_prompts("url", p["path"], tmp_path / "prompts.txt", url=p["url"], sha256=p["sha256"])
    assert len(read_prompts(out)) == N_PROMPTS
    with pytest.raises(AssetError, match="sha256"):
        fetch_prompts("url", p["path"], tmp_path / "bad.txt", url=p["url"], sha256="0" * 64)
    for name in LAYERS:
        block = merged["models"][name]["labels"]
        assert block["source"] == "neuronpedia" and LOOPBACK.match(block["url"])
        sae = merged["models"][name]["sae"]  # the Neuronpedia ids come from sae-lens's directory entry of this SAE
        width = sae_width(merged["models"][name])
        man = fetch_labels(block, name, tmp_path / f"{name}.csv", tmp_path / f"{name}.json", d_sae=width, sae=sae)
        assert man["label_counts"]["missing"] == 0 and man["label_counts"]["out_of_range"] == 0
        assert man["n_batches"] == len(block["batch_sha256"]) == (2 if name == "gemma-2-2b" else 1)
        assert all(f["sha256"] == block["batch_sha256"][f["file"]] for f in man["files"])
        labels = (tmp_path / f"{name}.csv").read_text()
        assert "dog" in labels and "Eiffel Tower" in labels and "the end of a sentence" in labels
        bad = {**block, "batch_sha256": {"batch-0.jsonl.gz": "f" * 64}}
        with pytest.raises(LabelsError, match="sha256"):
            fetch_labels(bad, name, tmp_path / f"{name}-bad.csv", tmp_path / f"{name}-bad.json", d_sae=width, sae=sae)


def test_override_changes_only_n_and_endpoints(rehearsal, merged):
    over = yaml.safe_load(rehearsal["override"].read_text())
    allowed = {
        "prompts", "models", "judge", "threshold_judge", "concreteness", "cross_judge", "generation", "selection",
        "calibration", "latent_shards", "detectors", "experiments", "sequential",
    }  # fmt: skip
    assert set(over) <= allowed
    for name, m in over["models"].items():
        assert set(m) == {"labels"}, name
    # every URL the merged paper config points at is loopback; judges read the dummy key's env var
    urls = []

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("url", "base_url") and v is not None:
                    urls.append((f"{path}.{k}", v))
                walk(v, f"{path}.{k}")

    walk(merged)
    assert len(urls) >= 1 + 5 + 3 + 4
    assert all(LOOPBACK.match(u) for _, u in urls), [x for x in urls if not LOOPBACK.match(x[1])]
    blocks = [
        merged["judge"],
        merged["threshold_judge"],
        merged["concreteness"],
        *merged["cross_judge"]["judges"].values(),
    ]
    assert all(b["api_key_env"] == JUDGE_KEY_ENV for b in blocks)
    assert merged["selection"]["n_latents"] <= 3 and merged["generation"]["max_new_tokens"] <= 16
    assert merged["judge"]["model"] == yaml.safe_load(PAPER.read_text())["judge"]["model"]


def test_loopback_judge_answers_every_judge_use(rehearsal, merged, monkeypatch):
    from esr.judge import build_concreteness_grader, build_judge

    monkeypatch.setenv(JUDGE_KEY_ENV, "rehearsal-dummy-key")
    fast = {"cache_dir": None, "rate_limit_per_s": None, "timeout_s": 5, "max_retries": 1}
    text = "Dogs bark at the mailman. Wait, that's not right. Let me start over. Bake the bread at 220 C."
    judges = {"judge": merged["judge"], "threshold_judge": merged["threshold_judge"], **merged["cross_judge"]["judges"]}
    for name, block in judges.items():
        res = build_judge({**block, **fast}, show_progress=False).grade("how do you bake bread", text, "dogs")
        assert res.ok and len(res.attempts) == 2, (name, res)
    grader = build_concreteness_grader({**merged["concreteness"], **fast}, show_progress=False)
    scores = grader.grade_labels(["references to dogs and puppies", "the end of a sentence"])
    assert [s.passes(merged["concreteness"]["threshold"]) for s in scores] == [True, False]
    paths = {h.path for h in rehearsal["judge"].hits}
    assert paths == {"/v1/messages", "/v1/chat/completions"}


def test_paper_dry_run_with_the_override_plans_every_rule(rehearsal, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [
        sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(work),
        "--configfile", str(PAPER), str(rehearsal["override"]), "--cores", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(rehearsal["assets"]), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.MULTILINE))
    for rule in ("download_model", "fetch_sae", "download_labels", "select_latents", "calibrate_boosts"):
        assert counts.get(rule) == "5", (rule, counts)
    for rule in ("fetch_prompts", "audit", "cross_model", "esr_figure"):
        assert counts.get(rule) == "1", (rule, counts)
    assert int(counts["cross_judge"]) == 5 and int(counts["generate"]) >= 5 and int(counts["grade"]) >= 5
    assert 100 < int(counts["total"]) < 400  # the full paper plan has ~1,400 jobs
    assert "huggingface.co" not in proc.stdout and "https://" not in proc.stdout

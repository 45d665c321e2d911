"""``python -m esr.generation_worker`` in one process on a tiny local model + SAE."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from esr.generation_worker import main, read_requests
from esr.testing import save_tiny_model_dir, tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)


def write_tiny_config(tmp_path) -> str:
    tok = tiny_tokenizer()
    save_tiny_model_dir(tiny_llama(vocab_size=len(tok)), tok, tmp_path / "model")
    tiny_sae(kind="jumprelu").save_model(str(tmp_path / "sae"))
    config = {
        "run_name": "tiny", "seed": 1, "prompts": {"source": "file", "path": "unused.txt"},
        "models": {"tiny": {
            "hf_id": "org/tiny", "source": "local", "path": str(tmp_path / "model"), "revision": "local",
            "family": "llama", "n_layers": 4, "n_params": 1, "dtype": "float32", "injection_layer": 2,
            "sae_layer": 2, "repetition_penalty": 1.1,
            "sae": {"source": "local", "path": str(tmp_path / "sae"), "boost_unit": "raw"},
            "boost": {"prior_mean": 1, "prior_std": 1, "lower": 0.0, "upper": 3}}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "config.yaml")


def test_worker_writes_results_and_activations(tmp_path):
    from safetensors.torch import load_file

    cfg = write_tiny_config(tmp_path)
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text(
        json.dumps({"trial_id": "a", "prompt": "how do you bake bread", "seed": 1,
                    "intervention": {"steer_latent": 5, "boost": 4.0, "capture": [5, 6]}}) + "\n"
        + json.dumps({"trial_id": "b", "prompt": "the dog", "seed": 2, "intervention": None}) + "\n")
    out = tmp_path / "results.jsonl"
    acts = tmp_path / "acts.safetensors"
    assert main(["--config", cfg, "--model", "tiny", "--requests", str(reqs), "--out", str(out),
                 "--activations", str(acts), "--max-new-tokens", "5", "--temperature", "0", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["trial_id"] for r in rows] == ["a", "b"]
    assert rows[0]["steering"]["boost_unit"] == "raw" and rows[0]["settings"]["repetition_penalty"] == 1.1
    assert load_file(str(acts))["a"].shape == (rows[0]["n_tokens"], 2)
    assert "packages" in json.loads((tmp_path / "results.jsonl.provenance.json").read_text())


def test_bad_request_line_names_the_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "x", "seed": 1}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_requests(p)

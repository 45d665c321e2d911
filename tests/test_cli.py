"""The ``esr`` CLI: steer on a tiny local model + SAE via a temporary config, latent label search, the parser."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from esr.cli import build_parser, main, search_labels
from esr.testing import save_tiny_model_dir, tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)


def write_tiny_setup(tmp_path, boost_unit: str = "raw") -> str:
    """A config with one local tiny Llama + local tiny SAE (no downloads); returns the config path."""
    tok = tiny_tokenizer()
    save_tiny_model_dir(tiny_llama(vocab_size=len(tok)), tok, tmp_path / "model")
    tiny_sae(kind="standard").save_model(str(tmp_path / "sae"))
    (tmp_path / "sae" / "esr_stats.json").write_text(json.dumps({"median_resid_norm": 10.0}))
    (tmp_path / "prompts.txt").write_text("how do you bake bread\n")
    config = {
        "run_name": "tiny",
        "seed": 1,
        "prompts": {"source": "file", "path": str(tmp_path / "prompts.txt")},
        "models": {
            "tiny": {
                "hf_id": "org/tiny",
                "source": "local",
                "path": str(tmp_path / "model"),
                "revision": "local",
                "family": "llama",
                "n_layers": 4,
                "n_params": 1,
                "dtype": "float32",
                "injection_layer": 2,
                "sae_layer": 2,
                "repetition_penalty": 1.1,
                "sae": {"source": "local", "path": str(tmp_path / "sae"), "boost_unit": boost_unit},
                "boost": {"prior_mean": 0.5, "prior_std": 0.3, "lower": 0.0, "upper": 1.5},
            }
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_steer_prints_answer_and_activations(tmp_path, capsys):
    cfg = write_tiny_setup(tmp_path, boost_unit="median_resid_norm")
    argv = [
        "steer",
        "--config",
        cfg,
        "--latent",
        "5",
        "--boost",
        "0.5",
        "--max-new-tokens",
        "4",
        "--seed",
        "3",
        "--ablate",
        "1,2",
        "--show-activations",
        "how do you bake bread",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "latent 5 boost 0.5 (median_resid_norm), residual norm 5.000" in err
    assert "# token\tlatent_5\tlatent_1\tlatent_2" in out
    assert len(out.strip().splitlines()[-4:]) == 4
    assert main(argv) == 0
    assert capsys.readouterr().out == out  # same seed, same answer


def test_steer_unknown_model(tmp_path):
    cfg = write_tiny_setup(tmp_path)
    with pytest.raises(SystemExit, match="'nope'"):
        main(["steer", "--config", cfg, "--model", "nope", "hi"])


def test_latents_search(tmp_path, capsys):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "latent,label,frequency,top_tokens\n0,Dogs and puppies,0.01,dog|puppy\n"
        "1,Countries,0.02,France|Spain\n2,hot dog stands,0.001,sausage\n"
    )
    assert [r["latent"] for r in search_labels(csv_path, "DOG")] == ["0", "2"]
    assert [r["latent"] for r in search_labels(csv_path, "spain", in_tokens=True)] == ["1"]
    assert main(["latents", "search", "dog", "--labels", str(csv_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("latent\t") and lines[1].startswith("0\t0.01\tDogs and puppies")
    assert main(["latents", "search", "zebra", "--labels", str(csv_path)]) == 1
    assert main(["latents", "search", "x", "--labels", str(tmp_path / "missing.csv")]) == 2


def test_parser_has_both_subcommands(capsys):
    help_text = build_parser().format_help()
    assert "steer" in help_text and "latents" in help_text
    with pytest.raises(SystemExit):
        main(["latents"])  # the latents command needs a further subcommand
    assert "search" in capsys.readouterr().err


def test_bad_ablate_list():
    with pytest.raises(SystemExit):
        main(["steer", "--ablate", "1,x", "hi"])

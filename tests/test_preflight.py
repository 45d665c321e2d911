"""Bad input files stop the workflow when it loads, naming the key and the file, before any job runs (issue 18.3)."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from esr.config import validate_config
from esr.preflight import InputError, check_inputs, local_inputs, safetensors_problem
from esr.testing import write_tiny_workflow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    path = write_tiny_workflow(root)
    return root, yaml.safe_load(path.read_text())


def _cfg(tiny, edit=None):
    import copy

    cfg = copy.deepcopy(tiny[1])
    if edit:
        edit(cfg)
    return validate_config(cfg)


def _problems(cfg, root) -> str:
    with pytest.raises(InputError) as err:
        check_inputs(cfg, root=root)
    return str(err.value)


def test_a_good_config_passes(tiny):
    check_inputs(_cfg(tiny), root=tiny[0])


def test_truncated_safetensors_is_named_with_sizes(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"W_dec": torch.zeros(64, 32), "b": torch.zeros(32)}, str(f))
    assert safetensors_problem(f) is None
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    why = safetensors_problem(f)
    assert why and str(f) in why and "truncated" in why and str(len(data)) in why
    f.write_bytes(data[:5])
    assert "no safetensors header" in safetensors_problem(f)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[100:])
    assert "unreadable safetensors header" in safetensors_problem(f)
    assert "does not exist" in safetensors_problem(tmp_path / "none.safetensors")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c, r: c["prompts"].update(path=str(r / "nope.txt")), "prompts.path: prompts file"),
        (
            lambda c, r: (r / "empty.txt").write_text("\n \n") and c["prompts"].update(path=str(r / "empty.txt")),
            "holds no prompts",
        ),
        (lambda c, r: c["prompts"].update(sha256="0" * 64), "prompts.sha256: prompts file"),
        (lambda c, r: c["models"]["tiny-llama"]["labels"].update(sha256="1" * 64), "models.tiny-llama.labels.sha256"),
        (lambda c, r: c["models"]["tiny-llama"]["sae"].update(path=str(r / "no_sae")), "models.tiny-llama.sae.path"),
        (
            lambda c, r: c["models"]["tiny-llama"].update(path=str(r / "no_model")),
            "models.tiny-llama.path: model folder",
        ),
    ],
)
def test_each_bad_input_names_its_key(tiny, edit, expected):
    root = tiny[0]
    msg = _problems(_cfg(tiny, lambda c: edit(c, root)), root)
    assert expected in msg, msg


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        ("feature_name,label_text\n0,a\n", "needs a latent column"),
        ("latent,label\n0,a\nx1,b\n", "must hold integers"),
        ("latent,label\n0,a\n-3,b\n", "negative latent index -3"),
    ],
)
def test_label_csv_header_and_latents_are_checked(tiny, tmp_path, csv, expected):
    bad = tmp_path / "labels.csv"
    bad.write_text(csv)
    msg = _problems(_cfg(tiny, lambda c: c["models"]["tiny-llama"]["labels"].update(path=str(bad))), tiny[0])
    assert "models.tiny-llama.labels" in msg and str(bad) in msg and expected in msg, msg


def test_all_problems_are_listed_at_once_and_weights_are_checked(tiny, tmp_path):
    import shutil

    root = tiny[0]
    sae = tmp_path / "sae"
    shutil.copytree(root / "tiny_sae", sae)
    w = sae / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def edit(c):
        c["models"]["tiny-llama"]["sae"]["path"] = str(sae)
        c["models"]["tiny-llama"]["path"] = str(model)
        c["prompts"]["path"] = str(tmp_path / "missing.txt")

    msg = _problems(_cfg(tiny, edit), root)
    assert f"{w} is truncated" in msg and "holds no weights" in msg and "missing.txt does not exist" in msg, msg


def test_built_embedded_sae_that_is_truncated_names_the_folder_to_delete(repo_root, tmp_path):
    cfg = validate_config(yaml.safe_load((repo_root / "config/config.yaml").read_text()))
    (tmp_path / "config/prompts").mkdir(parents=True)
    (tmp_path / cfg["prompts"]["path"]).write_text("How do I bake bread?\n")
    check_inputs(cfg, root=tmp_path)  # nothing built yet: nothing to check beyond the prompts
    folder = tmp_path / "resources/sae/smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    save_file({"W_dec": torch.zeros(8, 8)}, str(folder / "sae_weights.safetensors"))
    check_inputs(cfg, root=tmp_path)
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[:-10])
    msg = _problems(cfg, tmp_path)
    assert "delete resources/sae/smollm2-135m to rebuild it" in msg, msg


def test_local_files_are_rule_inputs(tiny):
    cfg = _cfg(tiny)
    files = local_inputs(cfg)
    assert files["prompts"] == [cfg["prompts"]["path"]]
    assert files["labels:tiny-llama"] == [cfg["models"]["tiny-llama"]["labels"]["path"]]
    cfg["models"]["tiny-llama"]["labels"] = {"source": "file", "url": "https://example.org/l.csv"}
    assert local_inputs(cfg)["labels:tiny-llama"] == []


def _snakemake(repo_root, workdir, config, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "--directory", str(workdir)]
    return subprocess.run(
        [*cmd, "--configfile", str(config), *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_workflow_stops_at_load_naming_the_key_and_an_edited_label_csv_reruns_its_rule(repo_root, tmp_path):
    config = write_tiny_workflow(tmp_path)
    labels = tmp_path / "labels.csv"
    good = labels.read_text()
    labels.write_text("latent,label\n0,a\nnot-a-number,b\n")
    res = _snakemake(repo_root, tmp_path, config, "-n", "--cores", "1")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "invalid configuration" in out and "models.tiny-llama.labels" in out and "must hold integers" in out
    assert "rule " not in res.stdout  # nothing planned, nothing run
    labels.write_text(good)
    # the label CSV and the prompts file are inputs: an edit in place (a newer file) reruns their rules
    plan = _snakemake(repo_root, tmp_path, config, "-n", "--cores", "1", "--forceall")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert str(labels) in plan.stdout and str(tmp_path / "prompts.txt") in plan.stdout

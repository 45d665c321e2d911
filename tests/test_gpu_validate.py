"""``tests/gpu/validate.py --tiny --device cpu``: the GPU validation script runs end to end on CPU with tiny shapes
(2-layer models, 256-latent SAEs, batches 1 and 4, 16 new tokens; ~20 s) and its JSON has every section."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "gpu" / "validate.py"
SHAPES = ("gemma2-2b", "llama-8b")
SECTIONS = ("environment", "throughput", "deepspeed", "batch_invariance", "memory")


def load_validate():
    """The script as a module (registered in ``sys.modules``: its dataclasses resolve annotations there)."""
    if "gpu_validate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_validate"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_validate"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_validate") / "gpu_validate.json"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "1", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), f"no JSON written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def test_tiny_run_passes_and_has_every_section(tiny_run):
    proc, data = tiny_run
    assert proc.returncode == 0, f"{data.get('failed_checks')} {data.get('errored_sections')}\n{proc.stderr[-3000:]}"
    assert data["ok"] is True and data["failed_checks"] == [] and data["errored_sections"] == []
    for section in SECTIONS:
        assert section in data, section
    env = data["environment"]
    assert env["status"] == "ok" and env["device"] == "cpu" and env["torch"] and env["transformers"]
    assert "deepspeed" in env and env["copy_bandwidth_gb_s"] > 0
    for section in SECTIONS[1:]:
        assert set(data[section]) == set(SHAPES), section
    # the summary printed last on stdout is the same JSON
    assert json.loads(proc.stdout[proc.stdout.index("\n{") + 1 :]) == data
    assert "| shape | batch | peak GiB" in proc.stdout


def test_throughput_numbers(tiny_run):
    _, data = tiny_run
    for shape in SHAPES:
        t = data["throughput"][shape]
        assert t["status"] == "ok", t
        assert [r["batch"] for r in t["rows"]] == [1, 4]
        for row in t["rows"]:
            for key in ("esr_unsteered_tok_s", "esr_steered_tok_s", "hf_generate_tok_s", "roofline_tok_s"):
                assert row[key] > 0, (shape, key, row)
            assert 0 < row["esr_unsteered_roofline_fraction"]
        assert t["weight_bytes_per_step"] > 0 and data["models"][shape]["median_resid_norm"] > 0


def test_deepspeed_hooks_fire_and_logits_match(tiny_run):
    _, data = tiny_run
    for shape in SHAPES:
        ds = data["deepspeed"][shape]
        if ds["status"] == "skipped":  # DeepSpeed cannot run here: the reason must say why
            assert isinstance(ds["reason"], str) and "deepspeed" in ds["reason"].lower(), ds
            continue
        assert ds["status"] == "ok", ds
        assert ds["engine"] == "deepspeed" and ds["accelerator"] == "cpu"
        assert ds["hooks_fire"] is True and any(ds["steered_tokens_differ"])
        assert ds["steered_logit_shift_min"] > ds["logit_tolerance"]
        assert ds["logits_within_tolerance"] is True
        assert 0 <= ds["first_token_logits_max_abs_diff"] <= ds["logit_tolerance"]
        assert {c["name"] for c in data["checks"]} >= {
            f"deepspeed.hooks_fire[{shape}]",
            f"deepspeed.first_token_logits[{shape}]",
        }


def test_batch_invariance_fractions(tiny_run):
    _, data = tiny_run
    for shape in SHAPES:
        inv = data["batch_invariance"][shape]
        assert inv["status"] == "ok", inv
        assert inv["batch_size"] == 32 and len(inv["rows_checked"]) == 4
        for mode in ("greedy", "sampled"):
            m = inv[mode]
            assert isinstance(m["matching_fraction"], float) and 0.0 <= m["matching_fraction"] <= 1.0
            assert m["n_match"] + len(m["first_difference"]) == m["n_rows"]
            assert all(isinstance(pos, int) and pos >= 0 for pos in m["first_difference"].values())
        assert inv["greedy"]["temperature"] == 0.0


def test_memory_is_null_on_cpu(tiny_run):
    _, data = tiny_run
    for shape in SHAPES:
        mem = data["memory"][shape]
        assert mem["status"] == "skipped" and "cuda" in mem["reason"]
        assert mem["peak_bytes_by_batch"] is None and mem["max_batch_20pct_headroom"] is None


def test_section_failures_are_recorded_and_set_the_exit_code():
    v = load_validate()
    results = {s: {} for s in v.SECTIONS}

    def boom(_):
        raise RuntimeError("kaput")

    def skip(_):
        raise v.Skip("no deepspeed here", tok_s=None)

    v.run_section(results, "throughput", "x", boom, None)
    v.run_section(results, "deepspeed", "x", skip, None)
    v.run_section(results, "memory", "x", lambda _: {"peak": 1}, None)
    assert results["throughput"]["x"]["status"] == "error" and "kaput" in results["throughput"]["x"]["error"]
    assert results["deepspeed"]["x"] == {
        "status": "skipped",
        "reason": "no deepspeed here",
        "tok_s": None,
        "seconds": results["deepspeed"]["x"]["seconds"],
    }
    assert results["memory"]["x"]["status"] == "ok" and results["memory"]["x"]["peak"] == 1
    results["deepspeed"]["y"] = {"status": "ok", "hooks_fire": False, "logits_within_tolerance": True}
    assert [c["passed"] for c in v.checks_of(results)] == [False, True]
    assert v.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert v.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert v.first_difference([1, 2], [1, 2, 3]) == 2


def test_real_shapes_match_the_released_models():
    """The random-weight configs have the parameter counts of Gemma-2-2B and Llama-3.1-8B (built on meta)."""
    import torch
    from transformers import AutoModelForCausalLM

    from esr.testing import tiny_tokenizer

    v = load_validate()
    expected = {"gemma2-2b": 2_614_341_888, "llama-8b": 8_030_261_248}
    for name, n_params in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                v.real_config(v.SHAPES[name], tiny_tokenizer()), dtype=torch.bfloat16
            )
        assert sum(p.numel() for p in model.parameters()) == n_params, name
        tied = name == "gemma2-2b"
        embed = model.get_input_embeddings().weight.numel() * 2
        assert v.weight_bytes_per_step(model) == 2 * n_params - (0 if tied else embed)


def test_memory_fit_and_table():
    """The CUDA-only memory arithmetic: a line through the peaks, the largest batch within 80 % of the device."""
    v = load_validate()
    gib = 2**30
    peaks = {1: 17 * gib + 20 * 2**20, 8: 17 * gib + 160 * 2**20, 64: 17 * gib + 1280 * 2**20}
    m = v.fit_memory(peaks, static=17 * gib, total=140 * gib)
    assert m["fit_per_row_bytes"] == pytest.approx(20 * 2**20)
    assert m["fit_fixed_bytes"] == pytest.approx(17 * gib, rel=1e-9)
    assert m["max_batch_20pct_headroom"] == int((0.8 * 140 * gib - 17 * gib) // (20 * 2**20))
    one = v.fit_memory({4: 10 * gib + 4 * 2**20}, static=10 * gib, total=20 * gib)
    assert one["fit_per_row_bytes"] == 2**20 and one["max_batch_20pct_headroom"] == 6 * 1024
    results = {
        "throughput": {},
        "memory": {
            "llama-8b": {"status": "ok", "kv_bytes_per_row_theoretical": 2**20, **m},
            "gemma2-2b": {"status": "skipped"},
        },
    }
    table = v.markdown_tables(results)
    assert f"| llama-8b | 64 | 18.25 | 20.0 | 1.0 | {m['max_batch_20pct_headroom']} |" in table
    assert "| gemma2-2b | - | null | null | null | null |" in table


def test_time_budget_skips_and_exits_2(tmp_path):
    """A used-up ``--max-minutes`` skips what is left (recorded), and the run exits 2 with partial JSON."""
    out = tmp_path / "v.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--max-minutes",
            "1e-9",
            "--shapes",
            "llama-8b",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["complete"] is True
    assert data["out_of_time_sections"] == [f"{s}[llama-8b]" for s in SECTIONS[1:]]
    assert "time budget" in data["throughput"]["llama-8b"]["reason"]

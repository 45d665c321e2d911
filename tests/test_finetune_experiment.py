"""Exp4 as an experiment: the masked-ratio sweep's derived model entries, held-out evaluation prompts for fine-tuned
models only, the gate (steered ESR vs unsteered restarts, Wilson bounds), the sweep table and report section, and the
DAG a tiny config with fine-tuning on plans (dry run)."""

from __future__ import annotations

import copy
import re

import pandas as pd
import pytest
import yaml
from statsmodels.stats.proportion import proportion_confint
from test_dag_tiny import _snakemake

from esr.config import ConfigError, load_config, model_specs, validate_config
from esr.exp4 import gate, model_row, report_section
from esr.finetune import eval_prompt_ids, sweep_model_name, sweep_models
from esr.io import read_json, write_json
from esr.latents import read_selection
from esr.metrics import Proportion
from esr.testing import TINY_PROMPTS, write_tiny_workflow
from esr.trials import write_trials

from helpers import graded_row


def _tiny(tmp_path, ratios=(0.25, 0.5, 0.75), enabled=True):
    cfg = yaml.safe_load(write_tiny_workflow(tmp_path).read_text())
    cfg["finetune"] = {"enabled": enabled, "masked_ratio_sweep": list(ratios)}
    return cfg


# ------------------------------------------------------------------------------------------------ derived entries


def test_sweep_derives_one_finetuned_model_per_ratio(tmp_path):
    cfg = validate_config(_tiny(tmp_path))
    base = cfg["models"]["tiny-llama"]
    derived = {n: m for n, m in cfg["models"].items() if n != "tiny-llama"}
    assert list(derived) == ["tiny-llama-ft-r25", "tiny-llama-ft-r50", "tiny-llama-ft-r75"]
    for name, ratio in zip(derived, (0.25, 0.5, 0.75)):
        m = derived[name]
        assert (m["source"], m["base_model"], m["masked_ratio"]) == ("finetuned", "tiny-llama", ratio)
        assert m["sae"] == base["sae"] and m["labels"] == base["labels"] and "path" not in m
        assert (m["n_layers"], m["sae_layer"], m["boost"]) == (base["n_layers"], base["sae_layer"], base["boost"])
    specs = model_specs(cfg)
    assert specs["tiny-llama-ft-r50"].masked_ratio == 0.5 and specs["tiny-llama"].masked_ratio is None
    # validating again (Snakemake re-reads a validated config) keeps the same entries
    assert list(validate_config(copy.deepcopy(cfg))["models"]) == list(cfg["models"])
    # the stage's data settings take the model's own ratio
    from esr.stages.finetune import data_settings

    assert data_settings(cfg["finetune"], 7, masked_ratio=specs["tiny-llama-ft-r25"].masked_ratio).masked_ratio == 0.25
    assert data_settings(cfg["finetune"], 7).masked_ratio == cfg["finetune"]["masked_ratio"]


def test_sweep_is_empty_when_off_and_refuses_collisions(tmp_path):
    off = validate_config(_tiny(tmp_path, enabled=False))
    assert list(off["models"]) == ["tiny-llama"] and sweep_models(off) == {}
    assert sweep_model_name(base="b", ratio=0.1) == "b-ft-r10" and sweep_model_name(base="b", ratio=0.9) == "b-ft-r90"
    with pytest.raises(ConfigError, match="0.5 and 0.501"):
        validate_config(_tiny(tmp_path, ratios=(0.5, 0.501)))
    clash = _tiny(tmp_path)
    clash["models"]["tiny-llama-ft-r50"] = copy.deepcopy(clash["models"]["tiny-llama"])
    with pytest.raises(ConfigError, match=r"finetune\.base_model.*2 candidate"):
        validate_config(copy.deepcopy(clash))
    clash["finetune"]["base_model"] = "tiny-llama"
    with pytest.raises(ConfigError, match=r"models\.tiny-llama-ft-r50"):
        validate_config(clash)
    bad = _tiny(tmp_path)
    bad["finetune"]["base_model"] = "nope"
    with pytest.raises(ConfigError, match=r"finetune\.base_model.*nope"):
        validate_config(bad)


def test_embedded_default_sweep_uses_the_base_models_embedded_sae():
    cfg = load_config("config/config.yaml", overrides={"finetune": {"enabled": True}})
    names = [n for n, m in cfg["models"].items() if m["source"] == "finetuned"]
    assert names == ["smollm2-135m-ft-r25", "smollm2-135m-ft-r50", "smollm2-135m-ft-r75"]
    assert all(cfg["models"][n]["sae"]["path"] == "resources/sae/smollm2-135m" for n in names)
    paper = load_config("config/paper.yaml", overrides={"finetune": {"enabled": True}})
    ft = [n for n, m in paper["models"].items() if m["source"] == "finetuned"]
    assert len(ft) == 9 and all(paper["models"][n]["base_model"] == "llama-3.1-8b" for n in ft)


# ------------------------------------------------------------------------------------------------ eval prompts


def test_finetuned_models_trials_use_only_the_held_out_prompts(tmp_path):
    from esr.stages import experiments as st

    cfg = validate_config(_tiny(tmp_path, ratios=(0.5,)))
    specs = model_specs(cfg)
    eval_prompts = [TINY_PROMPTS[1], TINY_PROMPTS[4]]
    manifest = tmp_path / "data_manifest.json"
    write_json(
        manifest, {"eval_prompts": eval_prompts, "train_prompts": [p for p in TINY_PROMPTS if p not in eval_prompts]}
    )
    common = dict(
        model_dir=cfg["models"]["tiny-llama"]["path"],
        prompts=cfg["prompts"]["path"],
        labels=cfg["models"]["tiny-llama"]["labels"]["path"],
        settings=cfg["selection"],
        concreteness=cfg["concreteness"],
        seed=cfg["seed"],
    )
    st.select_latents(spec=specs["tiny-llama"], selection=str(tmp_path / "base.json"), finetune_manifest=[], **common)
    st.select_latents(
        spec=specs["tiny-llama-ft-r50"], selection=str(tmp_path / "ft.json"), finetune_manifest=str(manifest), **common
    )
    base, ft = read_selection(tmp_path / "base.json"), read_selection(tmp_path / "ft.json")
    ft_ids = {p for s in ft.latents for p in s.prompt_ids}
    assert ft.latents and ft_ids <= {1, 4} and ft.n_prompts == len(TINY_PROMPTS)
    assert {p for s in base.latents for p in s.prompt_ids} - {1, 4}  # the base model draws from every prompt
    # every experiment replays the selection's prompts: exp1's plan for the fine-tuned model
    from esr.experiments import latent_plans, plan_steered

    plans = latent_plans(ft, {s.latent: 1.0 for s in ft.latents})
    assert {t.prompt for t in plan_steered("tiny-llama-ft-r50", plans, list(TINY_PROMPTS))} <= set(eval_prompts)


def test_eval_prompt_ids_errors_name_the_problem():
    assert eval_prompt_ids(manifest={"eval_prompts": ["b", "a"]}, prompts=["a", "b", "c"]) == [0, 1]
    with pytest.raises(ValueError, match="not in the prompt list"):
        eval_prompt_ids(manifest={"eval_prompts": ["z"]}, prompts=["a"])
    with pytest.raises(ValueError, match="eval_prompts"):
        eval_prompt_ids(manifest={}, prompts=["a"])


# ------------------------------------------------------------------------------------------------ the gate


def _wilson(k, n):
    return proportion_confint(k, n, alpha=0.05, method="wilson")


# 3/48 vs 40/200 does NOT pass: 3/48's Wilson upper bound 0.168 is above 40/200's lower bound 0.150 (statsmodels);
# 14/216 fails even against 0/48 (upper bound 0.074 > 0.039).
@pytest.mark.parametrize(
    ("unsteered", "steered", "passes"),
    [
        ((1, 48), (40, 200), True),
        ((3, 48), (40, 200), False),
        ((11, 48), (14, 216), False),
        ((0, 48), (14, 216), False),
    ],
)
def test_gate_from_known_counts(unsteered, steered, passes):
    u, s = Proportion(*unsteered), Proportion(*steered)
    assert u.wilson().hi == pytest.approx(_wilson(*unsteered)[1], abs=1e-12)
    assert s.wilson().lo == pytest.approx(_wilson(*steered)[0], abs=1e-12)
    assert gate(esr=s, unsteered=u) is passes
    assert (_wilson(*steered)[0] > _wilson(*unsteered)[1]) is passes
    assert gate(esr=s, unsteered=None) is None and gate(esr=s, unsteered=Proportion(0, 0)) is None


def _table(model, n, n_esr, n_multi_only=0, experiment="exp1", prompt_ids=(0, 1)):
    """``n`` graded trials: ``n_esr`` ESR (20 -> 60), ``n_multi_only`` multi-attempt but worse (60 -> 30), rest one
    attempt."""
    rows = []
    for i in range(n):
        if i < n_esr:
            scores, texts = [20.0, 60.0], ["Dogs bark loudly.", "Wait, that's not quite right. Bread needs flour."]
        elif i < n_esr + n_multi_only:
            scores, texts = [60.0, 30.0], ["Bread needs flour.", "Let me start over. Cats."]
        else:
            scores, texts = [50.0], ["Bread needs flour."]
        rows.append(
            graded_row(
                f"{experiment}|{model}|{i}",
                experiment,
                model,
                i % 5,
                "dogs",
                0.4,
                prompt_ids[i % len(prompt_ids)],
                "how do you bake bread",
                i,
                scores=scores,
                texts=texts,
                condition="steered" if experiment == "exp1" else "no_steering",
            )
        )
    return pd.DataFrame(rows)


def test_model_row_counts_rates_and_gate_from_trials():
    steered, unsteered = _table("ft", 200, 40, 10), _table("ft", 48, 0, 1, experiment="exp8")
    row = model_row(model="ft", base_model="b", masked_ratio=0.5, steered=steered, unsteered=unsteered)
    assert (row["esr_k"], row["esr_n"], row["multi_k"], row["improvement_k"], row["improvement_n"]) == (
        40,
        200,
        50,
        40,
        50,
    )
    assert (row["unsteered_restart_k"], row["unsteered_restart_n"]) == (1, 48)
    assert row["esr_lo"] == pytest.approx(_wilson(40, 200)[0]) and row["improvement_hi"] == pytest.approx(
        _wilson(40, 50)[1]
    )
    assert row["gate"] is True and row["role"] == "finetuned" and row["n_prompts"] == 2
    bad = model_row(
        model="ft",
        base_model="b",
        masked_ratio=0.5,
        steered=_table("ft", 216, 14),
        unsteered=_table("ft", 48, 0, 11, "exp8"),
    )
    assert bad["gate"] is False and bad["esr_k"] == 14 and bad["unsteered_restart_k"] == 11


# ------------------------------------------------------------------------------------------------ table and report


def _results_tree(root, *, ft_esr):
    """exp1/exp8 trials of a base and two fine-tuned models under ``root``; returns the summarise_exp4 inputs."""
    counts = {"base": (48, 0, 0, 1), "base-ft-r25": (200, 4, 0, 8), "base-ft-r75": (200, ft_esr, 0, 2)}
    steered, unsteered = [], []
    for m, (n, esr, _, restarts) in counts.items():
        for exp, table in (("exp1", _table(m, n, esr)), ("exp8", _table(m, 48, 0, restarts, experiment="exp8"))):
            path = root / exp / m / "trials.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_trials(path, table, "graded")
            (steered if exp == "exp1" else unsteered).append(str(path))
    models = {
        "base": {"base_model": None, "masked_ratio": None},
        "base-ft-r25": {"base_model": "base", "masked_ratio": 0.25},
        "base-ft-r75": {"base_model": "base", "masked_ratio": 0.75},
    }
    return steered, unsteered, models


@pytest.mark.parametrize("ft_esr", [40, 1])
def test_summary_table_and_report_section_from_a_small_results_tree(tmp_path, ft_esr):
    from esr.report import run_overview
    from esr.stages.finetune import summarise_exp4

    steered, unsteered, models = _results_tree(tmp_path, ft_esr=ft_esr)
    out = {
        k: str(tmp_path / "exp4" / f)
        for k, f in (
            ("table", "summary.parquet"),
            ("csv", "summary.csv"),
            ("transcripts", "transcripts.json"),
            ("report", "report.md"),
        )
    }
    summarise_exp4(steered=steered, unsteered=unsteered, models=models, **out)
    table = pd.read_parquet(out["table"])
    assert list(table["model"]) == ["base", "base-ft-r25", "base-ft-r75"]
    assert list(pd.read_csv(out["csv"])["esr_k"]) == [0, 4, ft_esr]
    r75 = table.set_index("model").loc["base-ft-r75"]
    assert r75["unsteered_restart_k"] == 2 and r75["unsteered_restart_n"] == 48
    assert r75["gate"] == (ft_esr == 40) and table.set_index("model").loc["base-ft-r25", "gate"] == False  # noqa: E712
    shown = read_json(out["transcripts"])["transcripts"]
    assert len(shown) == 3 and all(t["model"].startswith("base-ft") for t in shown)
    best, other = ("base-ft-r75", "base-ft-r25") if ft_esr == 40 else ("base-ft-r25", "base-ft-r75")
    assert [t["model"] for t in shown] == [best, other, best]  # in turn, the higher ESR rate first
    assert shown[0]["attempts"][1].startswith("Wait, that's not quite right.")

    summary = tmp_path / "summary.json"
    write_json(summary, {"cells": []})
    audit = tmp_path / "audit.json"
    write_json(audit, {"verdict_counts": {}})
    cfg = load_config("config/config.yaml")
    run_overview(cfg, [summary], audit, tmp_path / "overview.md", exp4_summary=out["table"])
    text = (tmp_path / "overview.md").read_text()
    section = text[text.index("## Exp4") : text.index("## Summaries")]
    assert section.strip() == "\n".join(report_section(table, shown)).strip()
    assert ("EXPERIMENTAL" in section) is (ft_esr != 40)
    assert "| base-ft-r75 | 0.75 |" in section and "(2/48)" in section and "RESTART" in section
    row75 = next(line for line in section.splitlines() if line.startswith("| base-ft-r75"))
    assert row75.endswith("| passes |" if ft_esr == 40 else "| **fails** |")
    assert f"({ft_esr}/200)" in row75 and "Wait, that's not quite right." in section

    run_overview(cfg, [summary], audit, tmp_path / "off.md")
    off = (tmp_path / "off.md").read_text()
    body = off[off.index("## Exp4") : off.index("## Summaries")].strip().splitlines()
    assert body[1:] == ["", "Exp4 is off in this run (`finetune.enabled: false`): no fine-tuned model was trained."]


# ------------------------------------------------------------------------------------------------ dry run


def test_dry_run_plans_the_sweep_and_each_finetuned_models_experiments(repo_root, tmp_path):
    cfg = _tiny(tmp_path, ratios=(0.25, 0.75))
    path = tmp_path / "ft_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = _snakemake(repo_root, tmp_path, path, "-n", "--cores", "1", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", res.stdout.split("Job stats:")[1].split("total")[0], re.M))
    counts = {k: int(v) for k, v in stats.items()}
    assert (counts["finetune_data"], counts["finetune_lora"], counts["merge_lora"]) == (2, 2, 2)
    assert counts["select_latents"] == counts["calibrate_boosts"] // 2 == counts["discover_detectors"] == 3
    assert counts["summarise_exp4"] == 1 and "cross_model" not in counts  # one base: no size trend
    for m in ("tiny-llama-ft-r25", "tiny-llama-ft-r75"):
        for exp in ("exp1", "exp8", "exp3", "exp10"):
            assert f"results/{exp}/{m}/trials.parquet" in res.stdout, (exp, m)
        assert f"results/finetune/{m}/data_manifest.json" in res.stdout
    select = [
        b for b in res.stdout.split("rule select_latents:")[1:] if "-ft-r25/selection.json" in b.split("rule ")[0]
    ]
    assert select and "results/finetune/tiny-llama-ft-r25/data_manifest.json" in select[0].split("output:")[0]

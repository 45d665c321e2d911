"""Exp4 as an experiment: the masked-ratio sweep's derived model entries, held-out evaluation prompts for fine-tuned
models only, the gate (steered ESR vs unsteered restarts, Wilson bounds), the sweep table and report section, and the
DAG a tiny config with fine-tuning on plans (dry run)."""

from __future__ import annotations

import copy
import functools
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


# ------------------------------------------------------------------------------------------------ shared material


def test_material_is_made_once_and_every_ratio_builds_its_mix_from_it(tmp_path, monkeypatch):
    from esr.stages import finetune as stages

    cfg = _tiny(tmp_path, ratios=(0.25, 0.75))
    cfg["finetune"].update(n_examples=8, answers_per_prompt=2, drift_per_prompt=2, max_new_tokens=12, drift_latents=4)
    cfg = validate_config(cfg)
    specs = model_specs(cfg)
    base, prompts = specs["tiny-llama"], cfg["prompts"]["path"]
    calls = []
    real = stages.generate_material
    monkeypatch.setattr(stages, "generate_material", lambda **kw: calls.append(kw) or real(**kw))
    mat = {k: str(tmp_path / f"material_{k}") for k in ("answers", "drift", "manifest")}
    stages.finetune_material(
        model_dir=cfg["models"]["tiny-llama"]["path"],
        prompt_list=prompts,
        spec=base,
        finetune=cfg["finetune"],
        generation=cfg["generation"],
        seed=cfg["seed"],
        **mat,
    )
    info = read_json(mat["manifest"])
    assert len(calls) == 1 and set(calls[0]["prompts"]) == set(info["train_prompts"])
    assert not set(info["train_prompts"]) & set(info["eval_prompts"])
    assert info["counts"] == {"answers": 2 * len(info["train_prompts"]), "drift": 2 * len(info["train_prompts"])}
    manifests = {}
    for name, ratio in (("tiny-llama-ft-r25", 0.25), ("tiny-llama-ft-r75", 0.75)):
        out = {"data": str(tmp_path / f"{name}.parquet"), "manifest": str(tmp_path / f"{name}.json")}
        stages.finetune_data(
            prompt_list=prompts,
            answers=mat["answers"],
            drift=mat["drift"],
            material=mat["manifest"],
            spec=specs[name],
            base_spec=base,
            finetune=cfg["finetune"],
            seed=cfg["seed"],
            **out,
        )
        manifests[name] = m = read_json(out["manifest"])
        assert m["counts"]["self_correction"] == round(ratio * 8) and m["n_examples"] == 8
        assert m["material"]["answers_sha256"] == info["answers_sha256"]
        data = pd.read_parquet(out["data"])
        assert set(data["prompt"]) <= set(info["train_prompts"])
    assert len(calls) == 1  # no ratio generated anything
    r25, r75 = manifests.values()
    assert r25["eval_prompts"] == r75["eval_prompts"] == info["eval_prompts"]
    # material made with other settings is refused, naming what to rerun
    other = copy.deepcopy(cfg["finetune"])
    other["drift_boosts"] = [9.0]
    with pytest.raises(ValueError, match="rerun finetune_material"):
        _data_call(
            cfg,
            mat,
            model="tiny-llama-ft-r25",
            finetune=other,
            data=str(tmp_path / "x.parquet"),
            manifest=str(tmp_path / "x.json"),
        )


def _material_call(tmp_path, cfg, **extra):
    """Rule finetune_material's body on the tiny model, its outputs under ``tmp_path``; returns the output paths."""
    from esr.stages import finetune as stages

    mat = {k: str(tmp_path / f"material_{k}") for k in ("answers", "drift", "manifest")}
    stages.finetune_material(
        model_dir=cfg["models"]["tiny-llama"]["path"],
        prompt_list=cfg["prompts"]["path"],
        spec=model_specs(cfg)["tiny-llama"],
        generation=cfg["generation"],
        seed=cfg["seed"],
        **mat,
        **extra,
    )
    return mat


def _data_call(cfg, mat, *, model, finetune, data, manifest):
    """Rule finetune_data's body for fine-tuned ``model`` of the tiny config, from ``_material_call``'s outputs."""
    from esr.stages import finetune as stages

    stages.finetune_data(
        prompt_list=cfg["prompts"]["path"],
        answers=mat["answers"],
        drift=mat["drift"],
        material=mat["manifest"],
        spec=model_specs(cfg)[model],
        base_spec=model_specs(cfg)["tiny-llama"],
        finetune=finetune,
        seed=cfg["seed"],
        data=data,
        manifest=manifest,
    )


#: The drift judge of these tests: a fake judge whose score is set by the steered latent's label (on topic: 90).
_OFF_TOPIC = {"dog, cat": 10.0, "bread, water": 30.0}


def _label_judge(block):
    from esr.judge.fake import FakeJudge

    return FakeJudge("label-judge", score_fn=lambda attempt, request: _OFF_TOPIC.get(request.latent_label, 90.0))


def test_drift_above_drift_max_score_never_reaches_the_training_data(tmp_path, monkeypatch):
    import esr.judge.factory as factory
    from esr.latents import labels_dict, read_labels
    from esr.stages import finetune as stages

    cfg = _tiny(tmp_path, ratios=(1.0,))
    cfg["finetune"].update(
        n_examples=24, answers_per_prompt=1, drift_per_prompt=6, max_new_tokens=12, drift_latents=12, drift_max_score=40
    )
    cfg = validate_config(cfg)
    built = []
    monkeypatch.setattr(factory, "build_judge", lambda block, **kw: built.append(block) or _label_judge(block))
    labels_csv = cfg["models"]["tiny-llama"]["labels"]["path"]
    with pytest.raises(ValueError, match=r"drift_max_score is set.*judge block and the labels file"):
        _material_call(tmp_path, cfg, finetune=cfg["finetune"], judge=cfg["judge"], labels=[])
    mat = _material_call(
        tmp_path, cfg, finetune=stages.material_settings(cfg["finetune"]), judge=cfg["judge"], labels=labels_csv
    )
    assert built == [cfg["judge"]]
    drift = pd.read_parquet(mat["drift"])
    labels = labels_dict(read_labels(labels_csv))
    # every record graded with its steered latent's label; some drift left the topic (<= 40), some did not
    expected = [_OFF_TOPIC.get(labels.get(int(lat)) or "", 90.0) for lat in drift["steer_latent"]]
    assert drift["score"].tolist() == expected
    assert (drift["score"] <= 40).any() and (drift["score"] > 40).any()
    info = read_json(mat["manifest"])
    assert info["material"]["drift_scored"] is True
    assert info["drift_judge"]["judge_id"] == "fake:label-judge" and info["drift_judge"]["ungraded"] == 0
    assert info["drift_judge"]["template_version"]
    out = {"data": str(tmp_path / "data.parquet"), "manifest": str(tmp_path / "data.json")}
    build_data = functools.partial(_data_call, cfg, mat, model="tiny-llama-ft-r100", finetune=cfg["finetune"], **out)
    build_data()
    data = pd.read_parquet(out["data"])
    off_topic = {int(lat) for lat, sc in zip(drift["steer_latent"], drift["score"]) if sc <= 40}
    assert len(data) == 24 and set(data["kind"]) == {"self_correction"}
    assert set(data["drift_latent"].astype(int)) <= off_topic
    assert read_json(out["manifest"])["drift_judge"] == info["drift_judge"]
    # a drift record the judge could not grade is dropped too
    failed = drift.assign(score=[None] * len(drift))
    failed.to_parquet(mat["drift"])
    with pytest.raises(ValueError, match="no usable steered"):
        build_data()


def test_no_drift_max_score_builds_no_judge_and_a_scored_drift_file_needs_scores(tmp_path, monkeypatch):
    import esr.judge.factory as factory
    from esr.stages import finetune as stages

    def no_judge(block, **kw):
        raise AssertionError("no judge may be built when finetune.drift_max_score is null")

    monkeypatch.setattr(factory, "build_judge", no_judge)
    cfg = _tiny(tmp_path, ratios=(0.5,))
    cfg["finetune"].update(answers_per_prompt=1, drift_per_prompt=1, max_new_tokens=8, drift_latents=2)
    cfg = validate_config(cfg)
    assert cfg["finetune"]["drift_max_score"] is None
    mat = _material_call(tmp_path, cfg, finetune=cfg["finetune"])  # neither judge nor labels given
    assert "score" not in pd.read_parquet(mat["drift"]).columns
    info = read_json(mat["manifest"])
    assert info["drift_judge"] is None and info["material"]["drift_scored"] is False
    # drift_source file: never graded; with drift_max_score set the file must carry its scores
    drift_file = tmp_path / "drift.jsonl"
    pd.DataFrame({"prompt": [TINY_PROMPTS[0]], "response": ["Boats float."]}).to_json(
        drift_file, orient="records", lines=True
    )
    ft = {**cfg["finetune"], "drift_source": "file", "drift_file": str(drift_file), "drift_max_score": 40}
    with pytest.raises(ValueError, match=r"finetune\.drift_max_score is set but finetune\.drift_file .* no 'score'"):
        _material_call(tmp_path, cfg, finetune=ft)
    pd.DataFrame({"prompt": [TINY_PROMPTS[0]], "response": ["Boats float."], "score": [12.0]}).to_json(
        drift_file, orient="records", lines=True
    )
    mat = _material_call(tmp_path, cfg, finetune=ft)
    assert (
        pd.read_parquet(mat["drift"])["score"].tolist() == [12.0] and read_json(mat["manifest"])["drift_judge"] is None
    )
    # whether the drift is scored is part of the material: finetune_data refuses material made the other way
    with pytest.raises(ValueError, match="rerun finetune_material"):
        _data_call(
            cfg,
            mat,
            model="tiny-llama-ft-r50",
            finetune={**ft, "drift_max_score": None},
            data=str(tmp_path / "x.parquet"),
            manifest=str(tmp_path / "x.json"),
        )
    # the value of drift_max_score is not: another threshold reuses the material
    assert stages.material_settings({**ft, "drift_max_score": 5}) == stages.material_settings(ft)
    assert stages.material_settings(stages.material_settings(ft)) == stages.material_settings(ft)


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


def _ft_stage_inputs(tmp_path):
    """The tiny workflow with one sweep model and a manifest holding prompts 1 and 4 out."""
    cfg = validate_config(_tiny(tmp_path, ratios=(0.5,)))
    manifest = tmp_path / "data_manifest.json"
    eval_prompts = [TINY_PROMPTS[1], TINY_PROMPTS[4]]
    write_json(
        manifest, {"eval_prompts": eval_prompts, "train_prompts": [p for p in TINY_PROMPTS if p not in eval_prompts]}
    )
    return cfg, model_specs(cfg), str(manifest)


def test_detector_discovery_and_calibration_of_a_finetuned_model_read_only_held_out_prompts(tmp_path, monkeypatch):
    from esr.generation import load_configured_generator
    from esr.stages import experiments as st

    cfg, specs, manifest = _ft_stage_inputs(tmp_path)
    ft, base_path = specs["tiny-llama-ft-r50"], cfg["models"]["tiny-llama"]["path"]
    seen: list[str] = []

    def recording_generator(*args, **kwargs):
        gen = load_configured_generator(*args, **kwargs)
        real = gen.generate

        def generate(requests, *a, **k):
            seen.extend(r.prompt for r in requests)
            return real(requests, *a, **k)

        gen.generate = generate
        return gen

    monkeypatch.setattr(st, "load_configured_generator", recording_generator)
    common = dict(model_dir=base_path, prompts=cfg["prompts"]["path"], generation=cfg["generation"], seed=cfg["seed"])
    det = dict(settings=cfg["detectors"], ablated=["discovered_top_auc"])
    st.discover_detectors(
        spec=ft,
        detectors=str(tmp_path / "ft_det.json"),
        answers=str(tmp_path / "ft_ans.parquet"),
        finetune_manifest=[manifest],
        **common,
        **det,
    )
    assert set(seen) == {TINY_PROMPTS[1], TINY_PROMPTS[4]}
    ft_ans = pd.read_parquet(tmp_path / "ft_ans.parquet")
    info = read_json(tmp_path / "ft_det.json")
    assert sorted(ft_ans["prompt_id"]) == [1, 4] and info["prompt_ids"] == [1, 4] and info["n_prompts"] == 2
    assert info["discovery_prompts"] == "held_out_evaluation"
    seen.clear()
    st.discover_detectors(
        spec=specs["tiny-llama"],
        detectors=str(tmp_path / "b_det.json"),
        answers=str(tmp_path / "b_ans.parquet"),
        **common,
        **det,
    )
    assert set(seen) == set(TINY_PROMPTS)  # the base model keeps every prompt
    base_ans = pd.read_parquet(tmp_path / "b_ans.parquet").set_index("prompt_id")
    # the same prompt is answered with the same seed by both models
    assert [base_ans.loc[i, "seed"] for i in (1, 4)] == list(ft_ans["seed"])

    sel = tmp_path / "ft_sel.json"
    st.select_latents(
        spec=ft,
        model_dir=base_path,
        prompts=cfg["prompts"]["path"],
        labels=cfg["models"]["tiny-llama"]["labels"]["path"],
        settings=cfg["selection"],
        concreteness=cfg["concreteness"],
        seed=cfg["seed"],
        selection=str(sel),
        finetune_manifest=manifest,
    )
    seen.clear()
    with pytest.raises(ValueError, match=r"2 held-out evaluation prompts.*check_samples \(5\)"):
        st.calibrate_boosts(
            spec=ft,
            selection=str(sel),
            settings=cfg["calibration"],
            judge=cfg["judge"],
            n_shards=1,
            shard=0,
            cache_dir=str(tmp_path / "cal_cache"),
            shard_result=str(tmp_path / "cal.json"),
            finetune_manifest=manifest,
            **common,
        )
    st.calibrate_boosts(
        spec=ft,
        selection=str(sel),
        settings={**cfg["calibration"], "check_samples": 2},
        judge={**cfg["judge"], "cache_dir": str(tmp_path / "judge_cache")},
        n_shards=1,
        shard=0,
        cache_dir=str(tmp_path / "cal_cache"),
        shard_result=str(tmp_path / "cal.json"),
        finetune_manifest=manifest,
        **common,
    )
    assert seen and set(seen) <= {TINY_PROMPTS[1], TINY_PROMPTS[4]}
    with pytest.raises(ValueError, match="1 evaluation prompt"):
        write_json(tmp_path / "one.json", {"eval_prompts": [TINY_PROMPTS[1]]})
        st.discover_detectors(
            spec=ft,
            detectors=str(tmp_path / "x.json"),
            answers=str(tmp_path / "x.parquet"),
            finetune_manifest=str(tmp_path / "one.json"),
            **common,
            **det,
        )


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


def test_base_rows_count_only_the_held_out_prompts_and_finetuned_rows_are_checked():
    from esr.exp4 import summary_table

    def named(table):  # prompt text from the prompt id (the helper's rows share one text)
        return table.assign(prompt=table["prompt_id"].map(lambda i: f"prompt {i}"))

    # the base's exp1: 10 trials on each of prompts 0-4, ESR only on prompt 0 (a training prompt)
    base = named(_table("base", 50, 0, prompt_ids=(0, 1, 2, 3, 4)))
    base.loc[base["prompt_id"] == 0, ["n_attempts", "first_score", "last_score"]] = [2, 20.0, 60.0]
    base = base.assign(
        attempt_scores=[[20.0, 60.0] if p == 0 else s for p, s in zip(base.prompt_id, base.attempt_scores)]
    )
    base_u = named(_table("base", 50, 0, 10, experiment="exp8", prompt_ids=(0, 1, 2, 3, 4)))
    ft = named(_table("base-ft-r50", 40, 8, prompt_ids=(3, 4)))
    ft_u = named(_table("base-ft-r50", 20, 0, 1, experiment="exp8", prompt_ids=(3, 4)))
    models = {
        "base": {"base_model": None, "masked_ratio": None},
        "base-ft-r50": {"base_model": "base", "masked_ratio": 0.5},
    }
    evals = {"base-ft-r50": ["prompt 3", "prompt 4"]}
    t = summary_table(
        steered={"base": base, "base-ft-r50": ft},
        unsteered={"base": base_u, "base-ft-r50": ft_u},
        models=models,
        eval_prompts=evals,
    ).set_index("model")
    assert (t.loc["base", "esr_n"], t.loc["base", "n_prompts"], t.loc["base", "prompt_set"]) == (20, 2, "held_out")
    assert t.loc["base", "esr_k"] == 0 and t.loc["base", "unsteered_restart_n"] == 20
    assert (t.loc["base-ft-r50", "esr_k"], t.loc["base-ft-r50", "esr_n"]) == (8, 40)
    assert t.loc["base-ft-r50", "prompt_set"] == "held_out"
    # without manifests every trial counts (the base's ESR on its training prompt 0 included)
    t_all = summary_table(steered={"base": base, "base-ft-r50": ft}, unsteered=None, models=models).set_index("model")
    assert (t_all.loc["base", "esr_n"], t_all.loc["base", "prompt_set"]) == (50, "all") and t_all.loc[
        "base", "esr_k"
    ] > 0
    # a fine-tuned model's trial on a training prompt is a DAG error, named
    leak = named(_table("base-ft-r50", 40, 8, prompt_ids=(2, 3)))
    with pytest.raises(ValueError, match="'prompt 2'.*held-out"):
        summary_table(steered={"base": base, "base-ft-r50": leak}, unsteered=None, models=models, eval_prompts=evals)
    with pytest.raises(ValueError, match="different prompts"):
        summary_table(
            steered={"base": base, "base-ft-r50": ft, "base-ft-r75": ft},
            unsteered=None,
            models={**models, "base-ft-r75": {"base_model": "base", "masked_ratio": 0.75}},
            eval_prompts={**evals, "base-ft-r75": ["prompt 3", "prompt 4", "prompt 2"]},
        )
    lines = report_section(t.reset_index())
    assert any("held-out evaluation prompts only" in line for line in lines)
    assert next(line for line in lines if line.startswith("| base |")).startswith("| base | base | 2 held-out |")


# ------------------------------------------------------------------------------------------------ planted control


def test_planted_control_is_a_fixture_never_run_for_a_finetuned_model(tmp_path):
    from esr.experiments import REGISTRY

    cfg = validate_config(_tiny(tmp_path, ratios=(0.5,)))  # the tiny fixture switches the planted control on
    specs = model_specs(cfg)
    assert REGISTRY["planted"].conditions(cfg, specs["tiny-llama"]) == ["restart"]
    assert REGISTRY["planted"].conditions(cfg, specs["tiny-llama-ft-r50"]) == []
    for path in ("config/config.yaml", "config/paper.yaml"):
        shipped = load_config(path)
        assert shipped["experiments"]["planted_control"]["enabled"] is False, path
        assert all(REGISTRY["planted"].conditions(shipped, s) == [] for s in model_specs(shipped).values())


# ------------------------------------------------------------------------------------------------ per-model settings


def test_a_handwritten_finetuned_entry_inherits_its_base_models_settings(tmp_path):
    cfg = _tiny(tmp_path, ratios=())
    base = cfg["models"]["tiny-llama"]
    base["resources"] = {"mem_mb": 1234, "runtime_min": 77}
    base["calibration"] = {"samples_per_step": 3}
    cfg["models"]["tiny-ft"] = {"source": "finetuned", "base_model": "tiny-llama", "resources": {"gpu": 1}}
    out = validate_config(cfg)["models"]["tiny-ft"]
    assert out["resources"] == {"mem_mb": 1234, "runtime_min": 77, "gpu": 1}  # its own key kept, the rest inherited
    assert out["calibration"] == {"samples_per_step": 3} and out["boost"] == base["boost"]
    assert out["revision"] == "finetuned" and "path" not in out and out["hf_id"] == base["hf_id"]
    from esr.calibration import model_settings

    spec = model_specs(validate_config(copy.deepcopy(cfg)))["tiny-ft"]
    assert model_settings(cfg["calibration"], spec).samples_per_step == 3


def test_n_latents_per_model_falls_back_to_the_base_model(tmp_path):
    from esr.fidelity import _n_latents
    from esr.latents import model_selection_settings

    block = {"n_latents": 10, "n_latents_per_model": {"base": 30, "own": 5}}
    assert model_selection_settings(block, "base-ft-r50", base_model="base").n_latents == 30
    assert model_selection_settings(block, "own", base_model="base").n_latents == 5
    assert model_selection_settings(block, "other").n_latents == 10
    cfg = validate_config(_tiny(tmp_path, ratios=(0.5,)))
    cfg["selection"]["n_latents_per_model"] = {"tiny-llama": 7}
    assert _n_latents(cfg, "tiny-llama-ft-r50") == 7 and _n_latents(cfg, "tiny-llama") == 7


# ------------------------------------------------------------------------------------------------ dry run


def _job_blocks(stdout: str, rule: str, output_has: str) -> list[str]:
    """The dry run's job blocks of ``rule`` whose output names ``output_has``."""
    blocks = [b.split("\n\n")[0] for b in stdout.split(f"rule {rule}:")[1:]]
    return [b for b in blocks if output_has in b.split("output:")[1].split("\n")[0]]


def test_dry_run_plans_the_sweep_and_each_finetuned_models_experiments(repo_root, tmp_path):
    cfg = _tiny(tmp_path, ratios=(0.25, 0.75))
    # per-model settings of the base model, inherited by its fine-tunes (one kind each)
    cfg["latent_shards_per_model"] = {"tiny-llama": 3}
    cfg["models"]["tiny-llama"]["resources"] = {"mem_mb": 1234, "runtime_min": 77}
    # the drift is graded (drift_max_score set) by the offline judge anchored on the base model's answers
    cfg["finetune"]["drift_max_score"] = 40
    cfg["judge"] = {"backend": "offline_minilm", "anchors": "auto", "cache_dir": str(tmp_path / "judge_cache")}
    path = tmp_path / "ft_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = _snakemake(repo_root, tmp_path, path, "-n", "--cores", "1", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (mat,) = _job_blocks(res.stdout, "finetune_material", "results/finetune_material/tiny-llama/answers.parquet")
    mat_inputs = mat.split("output:")[0]
    assert "resources/labels/tiny-llama.csv" in mat_inputs and "results/judge/tiny-llama/anchors.json" in mat_inputs
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", res.stdout.split("Job stats:")[1].split("total")[0], re.M))
    counts = {k: int(v) for k, v in stats.items()}
    # the base model's material once, shared by both ratios; one mix, adapter and merge per ratio
    assert counts["finetune_material"] == 1
    assert (counts["finetune_data"], counts["finetune_lora"], counts["merge_lora"]) == (2, 2, 2)
    for m in ("tiny-llama-ft-r25", "tiny-llama-ft-r75"):
        (job,) = _job_blocks(res.stdout, "finetune_data", f"results/finetune/{m}/data.parquet")
        assert "results/finetune_material/tiny-llama/manifest.json" in job.split("output:")[0]
    # latent_shards_per_model of the base: 3 calibration shards for each of the 3 models
    assert counts["select_latents"] == counts["calibrate_boosts"] // 3 == counts["discover_detectors"] == 3
    assert counts["summarise_exp4"] == 1 and "cross_model" not in counts  # one base: no size trend
    # the base's resources: a fine-tuned model's model jobs ask for the same memory and time
    (sel,) = _job_blocks(res.stdout, "select_latents", "tiny-llama-ft-r75/selection.json")
    assert "mem_mb=1234" in sel
    (det,) = _job_blocks(res.stdout, "discover_detectors", "tiny-llama-ft-r75/detectors.json")
    assert "mem_mb=1234" in det and "runtime=77" in det
    # held-out prompts: every prompt-reading stage of a fine-tuned model reads its manifest; the base's do not
    for rule, out in (
        ("discover_detectors", "detectors.json"),
        ("calibrate_boosts", "shard-0.json"),
        ("select_latents", "selection.json"),
    ):
        (ft_job,) = _job_blocks(res.stdout, rule, f"tiny-llama-ft-r25/{out}")
        assert "results/finetune/tiny-llama-ft-r25/data_manifest.json" in ft_job.split("output:")[0], rule
        (base_job,) = _job_blocks(res.stdout, rule, f"/tiny-llama/{out}")
        assert "data_manifest.json" not in base_job.split("output:")[0], rule
    # summarise_exp4 reads the fine-tuned models' manifests (the base rows' prompts)
    (summ,) = _job_blocks(res.stdout, "summarise_exp4", "results/exp4/summary.parquet")
    assert summ.split("output:")[0].count("data_manifest.json") == 2
    # the planted control (on in the tiny config, a test fixture) never runs for a fine-tuned model
    assert "results/planted/tiny-llama/trials.parquet" in res.stdout
    assert "results/planted/tiny-llama-ft" not in res.stdout
    for m in ("tiny-llama-ft-r25", "tiny-llama-ft-r75"):
        for exp in ("exp1", "exp8", "exp3", "exp10"):
            assert f"results/{exp}/{m}/trials.parquet" in res.stdout, (exp, m)
        assert f"results/finetune/{m}/data_manifest.json" in res.stdout
    # drift_max_score null: the material needs neither the labels nor the judge's anchors
    cfg["finetune"]["drift_max_score"] = None
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    target = "results/finetune_material/tiny-llama/manifest.json"
    res = _snakemake(repo_root, tmp_path, path, "-n", "--cores", "1", target, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (mat,) = _job_blocks(res.stdout, "finetune_material", "results/finetune_material/tiny-llama/answers.parquet")
    assert "resources/labels" not in mat.split("output:")[0] and "anchor_judge" not in res.stdout

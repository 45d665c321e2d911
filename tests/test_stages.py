"""The stage layer: every rule has one function of its name in the module of its rule file, every script is one
call, and ``bind_rule`` binds a job's named inputs/outputs/params/wildcards to the function by name."""

import ast
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from snakemake.iocontainers import Namedlist

from esr import stages
from esr.experiments import REGISTRY
from esr.stages import RuleBindingError, bind_rule
from esr.stages import stats as _stats  # noqa: F401  (loads stages.stats for the registry check)

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    m.group(1): smk.stem
    for smk in (ROOT / "workflow/rules").glob("*.smk")
    for m in re.finditer(r"^rule (\w+):", smk.read_text(), re.M)
}


def test_every_rule_calls_the_function_of_its_name_in_its_rule_files_module():
    import importlib

    assert len(RULES) >= 25
    for rule, module in RULES.items():
        script = (ROOT / "workflow/rules" / f"{module}.smk").read_text()
        block = script[script.index(f"rule {rule}:") :]
        assert f'"../scripts/{rule}.py"' in block.split("\nrule ")[0], rule
        fn = getattr(importlib.import_module(f"esr.stages.{module}"), rule)
        assert fn.__name__ == rule and fn.__module__ == f"esr.stages.{module}"
        # the script is the one call run_rule(<rule function>, snakemake)
        tree = ast.parse((ROOT / "workflow/scripts" / f"{rule}.py").read_text())
        calls = [n for n in tree.body if isinstance(n, ast.Expr)]
        assert len(calls) == 2 and ast.unparse(calls[1]) == f"run_rule({rule}, snakemake)", rule


def test_no_stage_is_found_through_a_string():
    text = "\n".join(p.read_text() for p in [*(ROOT / "src").rglob("*.py"), *(ROOT / "workflow").rglob("*.py")])
    assert "import_module" not in text and 'run_stage("' not in text
    assert not (ROOT / "src/esr/runs.py").exists() and not (ROOT / "src/esr/stages.py").exists()


def _job(rule="r", output=None, input=None, params=None, wildcards=None):
    class Job:
        pass

    job = Job()
    job.rule = rule
    for kind, values in (("output", output), ("input", input), ("params", params), ("wildcards", wildcards)):
        nl = Namedlist()
        for name, value in (values or {}).items():
            if isinstance(value, list):
                start = len(nl)
                nl.extend(value)
                nl._set_name(name, start, len(nl))
            else:
                nl.append(value)
                nl._set_name(name, len(nl) - 1)
        setattr(job, kind, nl)
    return job


def stage_fn(*, model: str, shard: int, shards: list[str], settings: dict, out: str, optional: str = "x"):
    return locals()


def test_bind_rule_binds_by_name_and_converts():
    job = _job(
        output={"out": "o.json"},
        input={"shards": ["a", "b"], "dep": "d"},
        params={"settings": {"k": 1}},
        wildcards={"model": "m", "shard": "3"},
    )
    kw = bind_rule(stage_fn, job)
    assert kw == {"model": "m", "shard": 3, "shards": ["a", "b"], "settings": {"k": 1}, "out": "o.json"}
    assert type(kw["shards"]) is list and stage_fn(**kw)["optional"] == "x"


def test_bind_rule_errors_name_the_rule_and_the_parameter():
    with pytest.raises(RuleBindingError, match="rule r: .*stage_fn needs 'settings'"):
        bind_rule(stage_fn, _job(output={"out": "o"}, input={"shards": []}, wildcards={"model": "m", "shard": "1"}))
    with pytest.raises(RuleBindingError, match="rule r: params 'extra' is not a parameter"):
        bind_rule(
            stage_fn,
            _job(
                output={"out": "o"},
                input={"shards": []},
                params={"settings": {}, "extra": 1},
                wildcards={"model": "m", "shard": "1"},
            ),
        )
    with pytest.raises(RuleBindingError, match="'out' is named in both output and input"):
        bind_rule(
            stage_fn,
            _job(
                output={"out": "o"},
                input={"out": "i", "shards": []},
                params={"settings": {}},
                wildcards={"model": "m", "shard": "1"},
            ),
        )


def test_bind_rule_gives_unclaimed_named_inputs_to_var_keywords():
    def fig(*, model, figure, **trials):
        return trials

    job = _job(output={"figure": "f.png"}, input={"exp1": "e1.parquet", "exp3": "e3.parquet"}, wildcards={"model": "m"})
    assert fig(**bind_rule(fig, job)) == {"exp1": "e1.parquet", "exp3": "e3.parquet"}


def test_model_stage_signature_is_the_functions():
    import inspect

    from esr.stages.experiments import generate

    assert "experiment" in inspect.signature(generate).parameters
    assert generate.__wrapped__.__name__ == "generate"


def test_registry_entries_are_complete():
    for name, exp in REGISTRY.items():
        assert exp.name == name and exp.description
        assert (exp.plan is not None) == (exp.made_by == "generate"), name
        assert exp.summary in (None, "trials", "cross_judge")
    assert [n for n, e in REGISTRY.items() if e.capture] == ["exp1"]
    assert set(stages.stats.SUMMARISERS) == {e.summary for e in REGISTRY.values() if e.summary}


# ------------------------------------------------------------------------------------------------ cross-model, specificity


def _graded(df, path):
    from esr.trials import write_trials

    write_trials(path, df, "graded")
    return str(path)


def _exp1(tmp_path, model, esr_every, multi_every, n_latents=160):
    from helpers import synthetic_trials

    return _graded(synthetic_trials("exp1", model, n_latents, multi_every, esr_every), tmp_path / f"{model}.parquet")


def test_cross_model_trend_finds_a_larger_model_that_resists_more(tmp_path):
    from esr.io import read_json

    n_params = {"small": 2.0e9, "large": 7.0e10}
    out = tmp_path / "cross.json"
    _stats.cross_model(
        trials=[_exp1(tmp_path, "small", 25, 20), _exp1(tmp_path, "large", 4, 3)], n_params=n_params, comparison=out
    )
    res = read_json(out)
    assert res["status"] == "ok" and [m["model"] for m in res["models"]] == ["small", "large"]
    assert res["rates"]["small"]["esr_rate"]["estimate"] == pytest.approx(0.04)
    assert res["rates"]["large"]["esr_rate"]["estimate"] == pytest.approx(0.25)
    for outcome in ("esr_rate", "multi_rate"):
        assert res["trend"][outcome]["slope"] > 0 and res["trend"][outcome]["pvalue"] < 1e-3
        assert res["trend"][outcome]["n_clusters"] == 320  # clustered by (model, latent)
        test = res["pairwise"][0]["tests"][outcome]
        assert test["holm"]["reject"] and test["fisher"]["pvalue"] < 1e-3


def test_cross_model_trend_is_not_significant_for_equal_rates_and_needs_two_models(tmp_path):
    from esr.io import read_json

    n_params = {"a": 2.0e9, "b": 9.0e9, "c": 2.7e10}
    tables = [_exp1(tmp_path, m, 10, 4) for m in n_params]
    out = tmp_path / "cross.json"
    _stats.cross_model(trials=tables, n_params=n_params, comparison=out)
    res = read_json(out)
    assert res["status"] == "ok" and len(res["pairwise"]) == 3
    for outcome in ("esr_rate", "multi_rate"):
        assert res["trend"][outcome]["pvalue"] > 0.05
        assert not any(p["tests"][outcome]["holm"]["reject"] for p in res["pairwise"])
    _stats.cross_model(trials=tables[:1], n_params=n_params, comparison=out)
    one = read_json(out)
    assert one["status"] == "not_run" and "needs >= 2 models" in one["reason"] and "trend" not in one


def test_specificity_pairs_each_detector_set_with_its_own_controls(tmp_path):
    from esr.io import read_json
    from esr.trials import read_trials

    from helpers import synthetic_trials

    def table(experiment, ablation_set, esr_every, multi_every):
        return synthetic_trials(
            experiment, "m", 100, multi_every, esr_every, condition=ablation_set, ablation_set=ablation_set
        )

    det = pd.concat([table("exp3", "otd", 50, 40), table("exp3", "lonely", 10, 5)])
    ctl = pd.concat([table("exp10", "random_otd_0", 5, 4), table("exp10", "random_otd_1", 10, 4)])
    ctl = pd.concat([ctl, table("exp10", "random_otd_x_0", 2, 2)])  # matched to another set "otd_x": not ours
    paths = {
        k: _graded(v.assign(trial_id=v.trial_id + v.ablation_set), tmp_path / f"{k}.parquet")
        for k, v in (("exp3", det), ("exp10", ctl))
    }
    out = tmp_path / "spec.json"
    _stats.specificity(model="m", detector_trials=paths["exp3"], control_trials=paths["exp10"], seed=1, comparison=out)
    res = read_json(out)
    assert [c["detector_set"] for c in res["comparisons"]] == ["otd"]
    assert any("lonely" in n for n in res["notes"])
    cmp = res["comparisons"][0]
    assert cmp["controls"] == ["random_otd_0", "random_otd_1"]
    assert all(p["n_pairs"] == 500 for p in cmp["paired"])
    # detector ESR 1/50 vs controls 1/5 and 1/10: the pooled paired difference is 0.02 - (0.2 + 0.1) / 2
    g = read_trials(paths["exp3"])
    assert (g.ablation_set == "otd").sum() == 500
    assert cmp["pooled"]["esr_rate"]["difference"]["mean"] == pytest.approx(0.02 - 0.15)
    lo, hi = cmp["pooled"]["esr_rate"]["difference"]["ci"]
    assert lo < 0.02 - 0.15 < hi < 0
    mc = cmp["paired"][0]["mcnemar"]["esr_rate"]
    assert mc["pvalue"] < 1e-6 and mc["b"] > mc["c"]  # the control (base) has more ESR-only pairs
    assert set(res["holm"]) == set(cmp["pvalues"]) and len(res["holm"]) == 4
    flip = cmp["pooled"]["esr_rate"]["cluster_sign_flip"]
    assert flip["n_clusters"] == 100 and flip["pvalue"] < 0.01 and flip["statistic"] == pytest.approx(0.02 - 0.15)
    assert cmp["pvalues"]["otd vs random_otd_0:esr_rate"] == cmp["paired"][0]["cluster_sign_flip"]["esr_rate"]["pvalue"]


# ------------------------------------------------------------------------------------------------ plans: exp2, exp5, exp10


def test_boost_sweep_merges_levels_clamped_to_zero_unless_told_not_to():
    from esr.experiments import global_levels

    thresholds = [1.0, 2.0, 3.0, 10.0]  # mean 4, SD ~3.54: -3, -2 and -1.29 SD clamp to boost 0
    mu, sd = float(np.mean(thresholds)), float(np.std(thresholds))
    separate = global_levels(thresholds, 8, 3.0, merge_clamped=False)
    assert len(separate) == 8 and sum(b == 0.0 for b, _ in separate) == 3
    merged = global_levels(thresholds, 8, 3.0)
    assert len(merged) == 6 and merged[0] == (0.0, pytest.approx(-mu / sd))
    assert merged[1:] == [lv for lv in separate if lv[0] > 0]
    assert global_levels([5.0, 6.0, 7.0], 4, 1.0) == global_levels([5.0, 6.0, 7.0], 4, 1.0, merge_clamped=False)


def test_meta_prompt_wordings_and_what_the_judge_sees():
    from esr.experiments import AUTHORS_META_PROMPTS, META_PROMPTS, LatentPlan, plan_meta_prompts

    assert not any("say so" in t or "start over" in t or "restart" in t for t in META_PROMPTS.values())
    assert AUTHORS_META_PROMPTS["self_monitor"] == (
        "If you notice yourself going off-topic, stop and force yourself to get back on track."  # paper Fig. 4
    )
    plans = [LatentPlan(3, "cheese", 2.0, (0,), (11,))]
    ours = plan_meta_prompts("m", plans, ["What is 2+2?"], ["self_monitor"])
    assert ours[0].prompt == "What is 2+2? " + META_PROMPTS["self_monitor"] and ours[0].judge_prompt == "What is 2+2?"
    authors = plan_meta_prompts("m", plans, ["Q?"], ["ignore_latent_label"], True, wording="authors")
    assert authors[0].prompt == "Q? You are being distracted with cheese. Ignore it." == authors[0].judge_prompt
    with pytest.raises(ValueError, match="experiments.meta_prompts.wording"):
        plan_meta_prompts("m", plans, ["Q?"], ["self_monitor"], wording="mine")


def test_random_controls_are_planned_per_ablated_set():
    from esr.config import ModelSpec
    from esr.experiments import random_control_targets

    spec = ModelSpec.from_config(
        "llama",
        {
            "hf_id": "a/b",
            "source": "hub",
            "revision": "r",
            "family": "llama",
            "n_layers": 2,
            "n_params": 1.0,
            "dtype": "float32",
            "injection_layer": 0,
            "sae_layer": 0,
            "repetition_penalty": 1.0,
            "sae": {"source": "local", "path": "x", "boost_unit": "raw"},
            "boost": {},
            "paper_detector_sets": ["otd_paper_26"],
        },
    )
    cfg = {"experiments": {"ablation": ["discovered_separability"]}, "detectors": {"random_control": {"n_sets": 2}}}
    assert random_control_targets(cfg, spec) == ["discovered_separability", "otd_paper_26"]  # default: ablated
    assert REGISTRY["exp10"].conditions(cfg, spec) == [
        "random_discovered_separability_0",
        "random_discovered_separability_1",
        "random_otd_paper_26_0",
        "random_otd_paper_26_1",
    ]
    cfg["detectors"]["random_control"]["match_to"] = "otd_paper_26"
    assert REGISTRY["exp10"].conditions(cfg, spec) == ["random_otd_paper_26_0", "random_otd_paper_26_1"]

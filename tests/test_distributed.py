"""Stages of tensor-parallel models run as DeepSpeed ranks under torchrun (esr.distributed): rank 0 alone writes
and calls the judge, every rank makes the same model calls, and the outputs equal the single-process stage's."""

import dataclasses
import sys

import pandas as pd
import pytest
import torch

from esr import distributed, runs
from esr.calibration import CalibrationCache
from esr.config import load_config, model_specs
from esr.io import read_json
from esr.testing import write_tiny_workflow


def test_share_and_from_writer_are_plain_calls_in_one_process():
    calls = []
    assert distributed.share({"a": 1}) == {"a": 1}
    assert distributed.from_writer(lambda: calls.append(1) or 7) == 7 and calls == [1]
    assert distributed.is_writer() and distributed.world_size() == 1


def test_run_stage_rejects_unknown_stage_and_bad_size():
    with pytest.raises(ValueError, match="unknown tensor-parallel stage 'grade_stage'"):
        distributed.run_stage("grade_stage", {}, 1)
    with pytest.raises(ValueError, match="tensor_parallel = 0"):
        distributed.run_stage("calibrate_stage", {}, 0)


def test_run_stage_in_process_for_tp1(monkeypatch):
    seen = {}
    monkeypatch.setattr(runs, "calibrate_stage", lambda **kw: seen.update(kw))
    distributed.run_stage("calibrate_stage", {"shard": 3}, 1)
    assert seen == {"shard": 3}


def test_a_launch_with_the_wrong_number_of_ranks_fails_clearly(tmp_path, capfd):
    # launched as one plain process, the rank sees WORLD_SIZE 1 but the stage asks for 2
    with pytest.raises(RuntimeError, match="calibrate_stage: the 2 tensor-parallel ranks failed"):
        distributed.run_stage("calibrate_stage", {"shard": 0}, 2, scratch_dir=tmp_path, launcher=[sys.executable])
    assert "launched with 1 processes, but the stage needs tensor_parallel 2" in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the pickled arguments are removed


def test_plain_turns_str_subclasses_into_str():
    class IOFile(str):
        pass

    class Named(list):
        pass

    out = distributed._plain({"a": IOFile("x"), "b": Named([IOFile("y")]), "c": (IOFile("z"), 1)})
    assert out == {"a": "x", "b": ["y"], "c": ("z", 1)}
    assert type(out["a"]) is str and type(out["b"]) is list and type(out["b"][0]) is str


def test_read_only_calibration_cache_never_writes(tmp_path):
    from esr.calibration import CalibrationResult

    class Key:
        latent = 5

        def digest(self):
            return "d" * 64

        def as_dict(self):
            return {"latent": 5}

    result = CalibrationResult(latent=5, threshold=1.0, achieved_score=0.3, check_samples=4, ci90_low=0.5,
                               ci90_high=1.5, at_bound=None, n_steps_done=3, history=[])
    path = CalibrationCache(tmp_path, read_only=True).put(Key(), result)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert CalibrationCache(tmp_path).put(Key(), result).exists()


@pytest.mark.slow
def test_tensor_parallel_stages_match_single_process(tmp_path):
    """Selection, detector discovery, boost calibration and the exp9 replay with tensor_parallel 2 (two ranks on
    CPU, gloo) write what the single-process stages write."""
    torch.set_num_threads(1)
    cfg = load_config(write_tiny_workflow(tmp_path))
    spec = model_specs(cfg)["tiny-llama"]
    tp_spec = dataclasses.replace(spec, engine="deepspeed", tensor_parallel=2)
    prompts, labels = cfg["prompts"]["path"], str(tmp_path / "labels.csv")
    out = {}
    for name, s in (("single", spec), ("tp", tp_spec)):
        d = tmp_path / name
        d.mkdir()
        out[name] = d
        common = dict(spec=s, model_dir=spec.path, prompts_path=prompts)
        distributed.run_stage("select_latents_stage", dict(
            common, labels_csv=labels, selection_cfg=cfg["selection"], concreteness_cfg=cfg["concreteness"],
            seed=cfg["seed"], out_json=d / "selection.json"), s.tensor_parallel, scratch_dir=d)
        distributed.run_stage("discover_detectors_stage", dict(
            common, gen_cfg=cfg["generation"], det_cfg=cfg["detectors"], seed=cfg["seed"],
            out_json=d / "detectors.json", answers_parquet=d / "answers.parquet"), s.tensor_parallel, scratch_dir=d)
        distributed.run_stage("calibrate_stage", dict(
            common, selection_json=d / "selection.json", gen_cfg=cfg["generation"], cal_cfg=cfg["calibration"],
            judge_cfg={**cfg["judge"], "cache_dir": str(d / "judge_cache")}, seed=cfg["seed"], n_shards=1, shard=0,
            cache_dir=d / "cache",
            out_json=d / "cal.json"), s.tensor_parallel, scratch_dir=d)
    a, b = out["single"], out["tp"]
    assert read_json(a / "selection.json")["latents"] == read_json(b / "selection.json")["latents"]
    pd.testing.assert_frame_equal(pd.read_parquet(a / "answers.parquet"), pd.read_parquet(b / "answers.parquet"))
    da, db = read_json(a / "detectors.json"), read_json(b / "detectors.json")
    for name in ("discovered_separability", "discovered_frequency"):  # threshold rules: robust to float noise
        assert da["detector_sets"][name]["latents"] == db["detector_sets"][name]["latents"]
    # the top-AUC ranking of a random tiny model is decided by near-ties (a prompt token often holds the max in both
    # the normal and the shuffled pair), which 1e-7 differences of the all-reduce order can flip: compare the
    # activations behind it instead
    ta, tb = (d["detector_sets"]["discovered_top_auc"]["stats"] for d in (da, db))
    assert len(ta) == len(tb) == cfg["detectors"]["top_auc_k"] and set(ta) & set(tb)
    for j in set(ta) & set(tb):
        for stat in ("normal_mean", "shuffled_mean"):
            assert abs(ta[j][stat] - tb[j][stat]) < 1e-4, (j, stat, ta[j], tb[j])
    ca, cb = read_json(a / "cal.json")["results"], read_json(b / "cal.json")["results"]
    assert [(r["latent"], r["threshold"], r["achieved_score"]) for r in ca] == \
        [(r["latent"], r["threshold"], r["achieved_score"]) for r in cb]
    # one cache file per successful latent: written once, by rank 0
    assert len(list((b / "cache").glob("*.json"))) == sum(r["error"] is None for r in cb) > 0
    assert not list(b.glob(".*-tp*"))  # scratch pickles removed

    # exp9 replay of planted self-corrections, single process vs two ranks
    gen = {}
    runs.gather_calibration_stage([a / "cal.json"], a / "thr.parquet", a / "cal_summary.json")
    for exp, cond in (("exp1", "steered"), ("exp8", "no_steering")):
        plan = runs.build_plan(exp, cond, spec.name, a / "selection.json", a / "thr.parquet", prompts,
                               a / "detectors.json", cfg["experiments"])
        runs.generate_stage(spec, spec.path, plan, cfg["generation"], a / f"{exp}-gen.parquet")
        gen[exp] = a / f"{exp}-gen.parquet"
    runs.plant_restarts_stage(gen["exp1"], gen["exp8"], 1.0, cfg["seed"], a / "planted-gen.parquet")
    for name in ("planted", "exp8"):
        runs.grade_stage(a / f"{name}-gen.parquet", cfg["judge"], a / f"{name}.parquet", a / f"{name}-judge.json")
    # the fake judge's scores are arbitrary: score every planted answer as a self-correction (20 -> 80)
    planted = pd.read_parquet(a / "planted.parquet")
    planted["attempt_scores"] = [[20.0, 80.0]] * len(planted)
    planted.to_parquet(a / "planted.parquet")
    for name, s in (("single", spec), ("tp", tp_spec)):
        d = out[name]
        distributed.run_stage("sequential_stage", dict(
            spec=s, model_dir=spec.path, trials_parquets=[a / "planted.parquet"], baseline_parquet=a / "exp8.parquet",
            detectors_json=a / "detectors.json", seq_cfg=cfg["sequential"], seed=cfg["seed"],
            out_store=d / "eps.zarr", out_baseline_store=d / "base.zarr", out_json=d / "analysis.json",
            summary_json=d / "summary9.json", fig_window=d / "w.png", fig_regions=d / "r.png"),
            s.tensor_parallel, scratch_dir=d)
    from esr.activations import open_store

    sa, sb = open_store(a / "eps.zarr"), open_store(b / "eps.zarr")
    assert sa.sizes["trial"] == sb.sizes["trial"] > 0
    torch.testing.assert_close(torch.from_numpy(sa.acts.values), torch.from_numpy(sb.acts.values), rtol=1e-4,
                               atol=1e-4, equal_nan=True)
    assert read_json(a / "analysis.json")["n_episodes"] == read_json(b / "analysis.json")["n_episodes"]

"""Stages of tensor-parallel models run as DeepSpeed ranks under torchrun (esr.distributed): rank 0 alone writes
and calls the judge, every rank makes the same model calls, and the outputs equal the single-process stage's."""

import dataclasses
import sys
import types

import pandas as pd
import pytest
import torch

from esr import distributed, ranks
from esr.calibration import CalibrationCache
from esr.config import load_config, model_specs
from esr.io import read_json
from esr.stages import experiments as st
from esr.stages import model_stage, stats
from esr.testing import write_tiny_workflow
from esr.trials import score_columns

from helpers import generate_kwargs, run_upstream


def test_share_and_from_writer_are_plain_calls_in_one_process():
    calls = []
    assert ranks.share({"a": 1}) == {"a": 1}
    assert ranks.from_writer(lambda: calls.append(1) or 7) == 7 and calls == [1]
    assert ranks.is_writer() and ranks.world_size() == 1


def test_run_ranks_needs_two_or_more():
    with pytest.raises(ValueError, match="tensor_parallel = 1"):
        distributed.run_ranks(st.anchor_judge, {}, 1)


def test_model_stage_is_a_plain_call_for_tp1():
    seen = {}

    @model_stage
    def stage(**kw):
        seen.update(kw)
        return "ran"

    spec = types.SimpleNamespace(tensor_parallel=1)
    assert stage(spec=spec, shard=3) == "ran" and seen == {"spec": spec, "shard": 3}


def test_a_launch_with_the_wrong_number_of_ranks_fails_clearly(capfd):
    # launched as one plain process, the rank sees WORLD_SIZE 1 but the stage asks for 2
    with pytest.raises(RuntimeError, match="esr.stages.experiments.anchor_judge: the 2 tensor-parallel ranks failed"):
        distributed.run_ranks(st.anchor_judge, {"answers": "x"}, 2, launcher=[sys.executable])
    assert "launched with 1 processes, but the stage needs tensor_parallel 2" in capfd.readouterr().err


def test_ranks_share_the_jobs_threads(capfd, monkeypatch):
    """Snakemake exports OMP_NUM_THREADS = the rule's threads and torchrun passes it on to every rank: the ranks get
    the job's threads divided among them instead (4 ranks of a 4-thread job: 1 each, not 4)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    before = torch.get_num_threads()
    torch.set_num_threads(6)  # the job's pool, as esr.stages.stage_logging sets it from the rule's threads
    try:
        assert (
            distributed.rank_threads(2) == 3 and distributed.rank_threads(4) == 1 and distributed.rank_threads(8) == 1
        )
        show = "import os, sys; print('OMP=' + os.environ['OMP_NUM_THREADS'], file=sys.stderr)"
        distributed.run_ranks(st.anchor_judge, {"answers": "x"}, 2, launcher=[sys.executable, "-c", show])
    finally:
        torch.set_num_threads(before)
    assert "OMP=3" in capfd.readouterr().err


def test_plain_turns_str_subclasses_into_str():
    class IOFile(str):
        pass

    class Named(list):
        pass

    out = distributed.plain({"a": IOFile("x"), "b": Named([IOFile("y")]), "c": (IOFile("z"), 1)})
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

    result = CalibrationResult(
        latent=5,
        threshold=1.0,
        achieved_score=0.3,
        check_samples=4,
        ci90_low=0.5,
        ci90_high=1.5,
        at_bound=None,
        n_steps_done=3,
        history=[],
    )
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
    out = {
        name: run_upstream(tmp_path / name, cfg, spec=s, n_shards=1) for name, s in (("single", spec), ("tp", tp_spec))
    }
    a, b = tmp_path / "single", tmp_path / "tp"
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
    ca, cb = read_json(a / "cal-0.json")["results"], read_json(b / "cal-0.json")["results"]
    assert [(r["latent"], r["threshold"], r["achieved_score"]) for r in ca] == [
        (r["latent"], r["threshold"], r["achieved_score"]) for r in cb
    ]
    # one cache file per successful latent: written once, by rank 0
    assert len(list((b / "cal_cache").glob("*.json"))) == sum(r["error"] is None for r in cb) > 0

    # exp9 replay of planted self-corrections, single process vs two ranks
    gen = {}
    for exp, cond in (("exp1", "steered"), ("exp8", "no_steering")):
        kw = generate_kwargs(cfg, out["single"], exp, cond, a)
        st.generate(**kw)
        gen[exp] = kw["trials"]
    st.plant_restarts(
        steered=gen["exp1"], unsteered=gen["exp8"], fraction=1.0, seed=cfg["seed"], trials=a / "planted-gen.parquet"
    )
    gen["planted"] = a / "planted-gen.parquet"
    for name in ("planted", "exp8"):
        st.grade(
            generated=gen[name], judge=cfg["judge"], trials=a / f"{name}.parquet", judge_stats=a / f"{name}-judge.json"
        )
    # the fake judge's scores are arbitrary: score every planted answer as a self-correction (20 -> 80)
    planted = pd.read_parquet(a / "planted.parquet")
    planted["attempt_scores"] = [[20.0, 80.0]] * len(planted)
    planted[["n_attempts", "first_score", "last_score"]] = score_columns(planted["attempt_scores"]).values
    planted.to_parquet(a / "planted.parquet")
    for name, s in (("single", spec), ("tp", tp_spec)):
        d = tmp_path / name
        stats.sequential(
            spec=s,
            model_dir=spec.path,
            trials=[a / "planted.parquet"],
            baseline=a / "exp8.parquet",
            detectors=a / "detectors.json",
            settings=cfg["sequential"],
            seed=cfg["seed"],
            store=d / "eps.zarr",
            baseline_store=d / "base.zarr",
            analysis=d / "analysis.json",
            summary=d / "summary9.json",
            window=d / "w.png",
            regions=d / "r.png",
        )
    from esr.activations import open_store

    sa, sb = open_store(a / "eps.zarr"), open_store(b / "eps.zarr")
    assert sa.sizes["trial"] == sb.sizes["trial"] > 0
    torch.testing.assert_close(
        torch.from_numpy(sa.acts.values), torch.from_numpy(sb.acts.values), rtol=1e-4, atol=1e-4, equal_nan=True
    )
    assert read_json(a / "analysis.json")["n_episodes"] == read_json(b / "analysis.json")["n_episodes"]

    # generation: the same exp1 shard (with activation capture) as one process and as two ranks
    kw_tp = generate_kwargs(cfg, out["single"], "exp1", "steered", b, spec=tp_spec)
    st.generate(**kw_tp)
    single, multi = pd.read_parquet(gen["exp1"]), pd.read_parquet(kw_tp["trials"])
    assert list(single.response) == list(multi.response) and list(single.n_tokens) == list(multi.n_tokens)
    sa = open_store(generate_kwargs(cfg, out["single"], "exp1", "steered", a)["activations"])
    sb = open_store(kw_tp["activations"])
    torch.testing.assert_close(
        torch.from_numpy(sa.acts.values), torch.from_numpy(sb.acts.values), rtol=1e-4, atol=1e-4, equal_nan=True
    )

"""The experiment stages in one process on a tiny model, local SAE and the fake judge: selection -> detector
discovery -> boost calibration -> generation (with activation capture) -> grading -> planted control -> exp9 ->
summaries -> audit. Checks the plumbing between modules, resumability and pairing."""

import json

import pandas as pd
import pytest
import torch

from esr.activations import open_store
from esr.assets import read_prompts
from esr.calibration import read_thresholds
from esr.config import load_config
from esr.detectors import read_detector_sets
from esr.experiments import PlanInputs, capture_latents, latent_plans, plan
from esr.io import read_json
from esr.latents import read_selection
from esr.stages import experiments as st
from esr.stages import stats
from esr.testing import write_tiny_workflow
from esr.trials import read_trials

from helpers import generate_kwargs, run_upstream

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyrun")
    cfg = load_config(write_tiny_workflow(root))
    return {"cfg": cfg, "root": root, **run_upstream(root / "results", cfg)}


def _plan(tiny, experiment, condition):
    inputs = PlanInputs(
        "tiny-llama",
        latent_plans(read_selection(tiny["selection"]), read_thresholds(tiny["thresholds"])),
        read_prompts(tiny["prompts"]),
        read_detector_sets(tiny["detectors"]),
        tiny["cfg"]["experiments"],
    )
    return plan(experiment, condition, inputs)


def test_selection_counts_and_determinism(tiny):
    sel = read_json(tiny["selection"])
    assert len(sel["latents"]) == 4
    assert sel["counts"]["unlabeled"] > 0  # empty labels and feature_<idx> placeholders are counted
    assert all(len(x["prompt_ids"]) == 2 == len(set(x["prompt_ids"])) for x in sel["latents"])
    again = tiny["root"] / "sel2.json"
    cfg = tiny["cfg"]
    st.select_latents(
        spec=tiny["spec"],
        model_dir=tiny["model_dir"],
        prompts=tiny["prompts"],
        labels=cfg["models"]["tiny-llama"]["labels"]["path"],
        settings=cfg["selection"],
        concreteness=cfg["concreteness"],
        seed=cfg["seed"],
        selection=again,
    )
    assert read_json(again)["latents"] == sel["latents"]


def test_detectors_and_matched_controls(tiny):
    det = read_json(tiny["detectors"])
    assert set(det["detector_sets"]) == {"discovered_separability", "discovered_frequency", "discovered_top_auc"}
    assert len(det["detector_sets"]["discovered_top_auc"]["latents"]) == 4
    detector_latents = {j for s in det["detector_sets"].values() for j in s["latents"]}
    assert set(det["random_sets"]) == {"random_discovered_top_auc_0", "random_discovered_top_auc_1"}
    info = det["random_control"]
    assert info["match_to"] == ["discovered_top_auc"] and info["stats_on"] == "all_pairs"
    drawn = [set(rs["latents"]) for rs in det["random_sets"].values()]
    if info["disjoint"]:  # disjoint from every detector set and from each other
        assert not (drawn[0] | drawn[1]) & detector_latents and not drawn[0] & drawn[1]
    else:
        assert info["notes"] and "pool too small" in info["notes"][0]
    assert det["discovery_prompts"] == "evaluation"
    assert det["detector_sets"]["discovered_top_auc"]["params"]["rank"].startswith("AUC")
    assert len(pd.read_parquet(tiny["answers"])) == 6


def test_thresholds_are_within_bounds_and_cached(tiny):
    table = pd.read_parquet(tiny["thresholds"])
    assert len(table) == 4
    ok = table[table.threshold.notna()]
    assert ((ok.threshold >= 0) & (ok.threshold <= 12)).all()
    assert len(list((tiny["root"] / "results" / "cal_cache").glob("*.json"))) == len(ok)


def test_generation_is_paired_resumable_and_captures(tiny, tmp_path):
    exp1 = _plan(tiny, "exp1", "steered")
    abl = _plan(tiny, "exp3", "discovered_top_auc")
    ctl = _plan(tiny, "exp10", "random_discovered_top_auc_0")
    key = [(t.latent, t.prompt_id, t.seed) for t in exp1]
    assert key == [(t.latent, t.prompt_id, t.seed) for t in abl] == [(t.latent, t.prompt_id, t.seed) for t in ctl]
    det = read_json(tiny["detectors"])
    assert all(t.ablate == tuple(sorted(det["detector_sets"]["discovered_top_auc"]["latents"])) for t in abl)
    assert all(t.ablate == tuple(det["random_sets"]["random_discovered_top_auc_0"]["latents"]) for t in ctl)
    # an empty discovered set runs as zero trials, never as another set
    if not det["detector_sets"]["discovered_frequency"]["latents"]:
        assert _plan(tiny, "exp3", "discovered_frequency") == []
    cfg = tiny["cfg"]
    kw = [generate_kwargs(cfg, tiny, "exp1", "steered", tmp_path, n_shards=2, shard=s) for s in range(2)]
    for k in kw:
        st.generate(**k)
    df = read_trials([k["trials"] for k in kw], "generated")
    assert sorted(df.trial_id) == sorted(t.trial_id for t in exp1)
    assert (df.n_tokens > 0).all()
    store_latents, _ = capture_latents(read_detector_sets(tiny["detectors"]), read_selection(tiny["selection"]))
    ds = open_store(kw[0]["activations"])
    assert (
        ds.sizes["trial"] == len(read_trials(kw[0]["trials"], "generated")) and list(ds.latent.values) == store_latents
    )
    # a rerun of the same shard regenerates identically (seeded per trial); exp8 writes no activation store
    again = generate_kwargs(cfg, tiny, "exp1", "steered", tmp_path / "again", n_shards=2, shard=0)
    st.generate(**again)
    assert list(read_trials(again["trials"], "generated").response) == list(
        read_trials(kw[0]["trials"], "generated").response
    )
    exp8 = generate_kwargs(cfg, tiny, "exp8", "no_steering", tmp_path)
    st.generate(**exp8)
    assert exp8["activations"].is_dir() and not list(exp8["activations"].iterdir())


def test_grading_planted_control_sequential_and_audit(tiny, tmp_path):
    cfg = tiny["cfg"]
    gen = {}
    for exp, cond in (("exp1", "steered"), ("exp8", "no_steering")):
        kw = generate_kwargs(cfg, tiny, exp, cond, tmp_path)
        st.generate(**kw)
        gen[exp] = kw["trials"]
    planted = tmp_path / "planted-gen.parquet"
    st.plant_restarts(steered=gen["exp1"], unsteered=gen["exp8"], fraction=1.0, seed=cfg["seed"], trials=planted)
    graded = {}
    for name, path in (("exp1", gen["exp1"]), ("exp8", gen["exp8"]), ("planted", planted)):
        graded[name] = tmp_path / f"{name}-trials.parquet"
        st.grade(generated=path, judge=cfg["judge"], trials=graded[name], judge_stats=tmp_path / f"{name}-judge.json")
    p = pd.read_parquet(graded["planted"])
    assert len(p) == len(pd.read_parquet(graded["exp1"])) and (p.n_attempts >= 2).all()
    assert json.loads((tmp_path / "planted-judge.json").read_text())["stats"]["backend_calls"] == len(p)
    # regrading is served from the cache
    st.grade(
        generated=planted, judge=cfg["judge"], trials=tmp_path / "again.parquet", judge_stats=tmp_path / "again.json"
    )
    assert json.loads((tmp_path / "again.json").read_text())["stats"]["backend_calls"] == 0

    seq = {
        k: tmp_path / v
        for k, v in (
            ("store", "eps.zarr"),
            ("baseline_store", "base.zarr"),
            ("analysis", "analysis.json"),
            ("summary", "summary9.json"),
            ("window", "w.png"),
            ("regions", "r.png"),
        )
    }
    stats.sequential(
        spec=tiny["spec"],
        model_dir=tiny["model_dir"],
        trials=[graded["exp1"], graded["planted"]],
        baseline=graded["exp8"],
        detectors=tiny["detectors"],
        settings=cfg["sequential"],
        seed=cfg["seed"],
        **seq,
    )
    analysis = read_json(seq["analysis"])
    assert analysis.get("skipped") or analysis["n_episodes"] > 0
    assert seq["window"].exists() and seq["regions"].exists()
    n_base = cfg["sequential"]["n_baseline"]
    assert analysis["baseline_source"] == "unsteered"
    assert analysis["n_baseline"] == min(n_base, len(read_trials(graded["exp8"])))
    # the authors' baseline: steered exp1 answers that stayed on topic in one attempt (score >= 50)
    authors = {k: tmp_path / f"authors-{v.name}" for k, v in seq.items()}
    settings = {**cfg["sequential"], "baseline_source": "steered_on_topic"}
    stats.sequential(
        spec=tiny["spec"],
        model_dir=tiny["model_dir"],
        trials=[graded["exp1"], graded["planted"]],
        baseline=graded["exp8"],
        detectors=tiny["detectors"],
        settings=settings,
        seed=cfg["seed"],
        **authors,
    )
    pool = read_trials([graded["exp1"], graded["planted"]])
    on_topic = ((pool.n_attempts == 1) & (pool.first_score >= 50) & (pool.boost > 0)).sum()
    assert read_json(authors["analysis"])["n_baseline"] == min(on_topic, n_base)
    assert read_json(authors["analysis"])["baseline_source"] == "steered_on_topic"

    summaries = []
    for name in ("exp1", "planted"):
        summaries.append(tmp_path / f"{name}-summary.json")
        stats.summarise(experiment=name, trials=graded[name], n_boot=50, seed=0, summary=summaries[-1])
    planted_cell = read_json(summaries[1])["cells"][0]
    assert planted_cell["experiment"] == "planted" and planted_cell["metrics"]["multi_rate"]["k"] == planted_cell["n"]
    out = {k: tmp_path / f"audit.{k.split('_')[-1]}" for k in ("table_json", "table_md", "table_html")}
    stats.audit(
        summaries=summaries + [seq["summary"]],
        config=cfg,
        model_map=cfg["audit"]["model_map"],
        overview=tmp_path / "overview.md",
        **out,
    )
    rows = read_json(out["table_json"])["numbers"]
    assert "not run in this configuration" in {r["verdict"] for r in rows} and len(rows) > 40


def test_generation_resumes_past_a_truncated_checkpoint(tiny, tmp_path, monkeypatch, caplog):
    """A job killed mid-generation leaves batch checkpoints; one cut short (a kill while writing, before checkpoints
    were atomic) is discarded with a warning naming it and regenerated; the result equals an uninterrupted run."""
    from esr.generation import SteeredGenerator

    cfg = {**tiny["cfg"], "generation": {**tiny["cfg"]["generation"], "batch_size": 2}}
    clean = generate_kwargs(cfg, tiny, "exp1", "steered", tmp_path / "clean")
    st.generate(**clean)
    kw = generate_kwargs(cfg, tiny, "exp1", "steered", tmp_path / "killed")
    real, calls = SteeredGenerator.generate_batch, []

    def dies_after_two(self, requests):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, requests)

    monkeypatch.setattr(SteeredGenerator, "generate_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        st.generate(**kw)
    monkeypatch.setattr(SteeredGenerator, "generate_batch", real)
    checkpoints = sorted(kw["trials"].parent.glob("*.partial/*/batch-*.pt"))
    assert len(checkpoints) == 2 and not list(kw["trials"].parent.glob("*.partial/*/.*"))  # no temporary left
    data = checkpoints[1].read_bytes()
    checkpoints[1].write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="esr.stages.experiments"):
        st.generate(**kw)
    assert str(checkpoints[1]) in caplog.text and "unreadable generation checkpoint" in caplog.text
    a, b = (read_trials(k["trials"], "generated").drop(columns="provenance") for k in (clean, kw))
    pd.testing.assert_frame_equal(a, b)
    assert not list(kw["trials"].parent.glob("*.partial"))

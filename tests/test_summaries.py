"""Summary cells (``esr.summary/1``) and comparisons (``esr.comparisons/1``) of graded trials tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from esr.summaries import (
    cell_label,
    compare_experiments,
    level_label,
    parse_level,
    summarise_cross_judge,
    summarise_experiment,
    summarise_table,
)
from esr.trials import empty_frame, score_columns, write_trials

from helpers import exp1_and_ablation_tables, synthetic_trials


def _write(df, path):
    write_trials(path, df, "graded")
    return path


def test_labels():
    assert level_label({"boost_level": "global:-1.00sd", "boost": 2.0}) == "global:-1.00sd"
    assert level_label({"boost_level": None, "boost": 2.5}) == "boost:2.5"
    assert parse_level("global:+0.50sd") == (0.5, None) and parse_level("relative:2") == (None, 2.0)
    assert parse_level("boost:2.5") == (None, None)
    assert cell_label({"experiment": "exp1"}) == "baseline"
    assert cell_label({"experiment": "exp3", "ablation_set": "otd", "prompt_variant": None}) == "ablation_set=otd"
    assert (
        cell_label({"experiment": "exp5", "ablation_set": "a", "prompt_variant": "v"})
        == "ablation_set=a,prompt_variant=v"
    )
    assert cell_label({"experiment": "exp2", "boost_level": "relative:0.5"}) == "level=relative:0.5"


def test_summarise_experiment_and_compare(tmp_path):
    base, abl = exp1_and_ablation_tables()
    abl["seed"] = base["seed"]
    paths = [_write(base, tmp_path / "base.parquet"), _write(abl, tmp_path / "abl.parquet")]
    summ = summarise_experiment(paths, tmp_path / "summary.json", n_boot=200)
    cells = {(c["experiment"], c["cell"]): c for c in summ["cells"]}
    assert set(cells) == {("exp1", "baseline"), ("exp3", "ablation_set=otd_paper_26")}
    b = cells[("exp1", "baseline")]
    assert b["n"] == 1000 and b["metrics"]["esr_rate"]["k"] == 40
    assert b["metrics"]["multi_rate"]["k"] == 40 + 50 - 10
    assert b["extra"] == {}
    assert cells[("exp3", "ablation_set=otd_paper_26")]["extra"] == {
        "ablation_set": "otd_paper_26",
        "n_ablated_latents": 26,
    }
    assert json.loads((tmp_path / "summary.json").read_text())["schema"] == "esr.summary/1"

    comp = compare_experiments(paths, tmp_path / "comp.json", others=["exp3"], n_boot=200)
    assert comp["schema"] == "esr.comparisons/1"
    assert comp["baseline"] == {"experiment": "exp1", "cell": "baseline"}
    assert comp["others"] == [{"experiment": "exp3", "cell": "*"}]
    fam = comp["families"][0]
    assert fam["paired"][0]["n_pairs"] == 1000
    assert set(fam["holm"]) >= {"paired:exp3/ablation_set=otd_paper_26:esr_rate"}
    # beside McNemar: the latent-clustered sign-flip test, and Holm over the clustered p-values
    flip = fam["paired"][0]["cluster_sign_flip"]["esr_rate"]
    assert flip["n_clusters"] == 200 and 0 < flip["pvalue"] <= 1
    assert fam["holm_clustered"]["paired_clustered:exp3/ablation_set=otd_paper_26:esr_rate"]["pvalue"] == flip["pvalue"]
    assert json.loads((tmp_path / "comp.json").read_text())["families"][0]["family"] == fam["family"]


def test_summarise_table_leaves_the_trial_condition_alone():
    df = synthetic_trials("exp3", "m", 4, 3, 7, condition="otd", ablation_set="otd", ablate=(3, 1, 3))
    before = df.copy()
    [c] = summarise_table(df, bootstrap=None)
    assert c["cell"] == "ablation_set=otd" and c["extra"]["n_ablated_latents"] == 2
    pd.testing.assert_frame_equal(df, before)  # no `cell` column added, `condition` unchanged


def _regraded(df, idx, scores):
    """``df`` with the attempt scores (and the score columns grading derives from them) of rows ``idx`` replaced."""
    out = df.copy()
    new = pd.Series([list(scores)] * len(idx), index=idx, dtype=object)
    out["attempt_scores"] = out["attempt_scores"].astype(object)
    out.loc[idx, "attempt_scores"] = new
    derived = score_columns(out["attempt_scores"])
    for col in ("n_attempts", "first_score", "last_score"):
        out[col] = derived[col].to_numpy()
    return out


def test_summarise_cross_judge(tmp_path):
    a = synthetic_trials("exp7", "m", 20, 4, 8)
    a["judge_id"] = "haiku"
    b = _regraded(a.assign(judge_id="gpt"), a.index[:5], [30.0])
    paths = [_write(a, tmp_path / "a.parquet"), _write(b, tmp_path / "b.parquet")]
    out = summarise_cross_judge(paths, tmp_path / "cj.json")
    allc = [c for c in out["cells"] if c["cell"] == "all"][0]
    assert allc["extra"] == {"n_judges": 2, "n_samples": 100}
    assert sorted(c["cell"] for c in out["cells"] if c["cell"] != "all") == ["judge=gpt", "judge=haiku"]
    pair = allc["judge_pairs"][0]
    assert pair["n_common"] == 100
    n_changed_multi = sum(1 for i in range(5) if i % 4 == 0 or i % 8 == 0)  # trials 0 and 4 were multi
    assert pair["multi_agreement"]["k"] == 100 - n_changed_multi
    # exp7 writes every judge into one table, each judge repeating the regraded trials' ids
    one = tmp_path / "exp7.parquet"
    pd.concat([a, b], ignore_index=True).to_parquet(one, index=False)
    again = summarise_cross_judge([one], tmp_path / "cj1.json")
    assert again["cells"] == out["cells"]


def test_summarise_table_per_boost_level():
    frames = []
    for b in (0.0, 2.5, 5.0):
        t = synthetic_trials("exp2", "llama-3.3-70b", 4, 3, 7)
        t["boost"] = b
        t["boost_level"] = f"global:{(b - 2.5) / 2.5:+.2f}sd"  # levels at mean 2.5, SD 2.5
        t["threshold"] = 5.0
        t["trial_id"] = t["trial_id"] + f"-{b}"
        frames.append(t)
    df = pd.concat(frames, ignore_index=True)
    cells = summarise_table(df, bootstrap=None)
    assert [c["cell"] for c in cells] == ["level=global:+0.00sd", "level=global:+1.00sd", "level=global:-1.00sd"]
    assert [c["extra"]["boost_sigma"] for c in cells] == [0.0, 1.0, -1.0]
    assert [c["extra"]["boost_rel"] for c in cells] == [0.5, 1.0, 0.0]
    assert all(c["n"] == 20 for c in cells)
    # global levels in SD units, relative levels in threshold multiples (esr.experiments)
    df["boost_level"] = ["global:-1.00sd"] * 20 + ["relative:0.5"] * 20 + ["global:+1.00sd"] * 20
    cells = {c["cell"]: c["extra"] for c in summarise_table(df, bootstrap=None)}
    assert cells["level=relative:0.5"] == {"boost": 2.5, "boost_sigma": None, "boost_rel": 0.5}
    assert cells["level=global:+1.00sd"] == {"boost": 5.0, "boost_sigma": 1.0, "boost_rel": 1.0}
    # no recorded level and no threshold: one cell per boost value, no σ or relative units
    df["boost_level"], df["threshold"] = None, None
    cells = {c["cell"]: c["extra"] for c in summarise_table(df, bootstrap=None)}
    assert cells["level=boost:2.5"] == {"boost": 2.5, "boost_sigma": None, "boost_rel": None}


def test_empty_tables(tmp_path):
    p = _write(empty_frame("graded"), tmp_path / "empty.parquet")
    assert summarise_experiment([p], tmp_path / "s.json")["cells"] == []
    assert compare_experiments([p], tmp_path / "c.json", others=["exp3"])["families"] == []
    assert summarise_cross_judge([p], tmp_path / "cj.json")["cells"] == []


@pytest.mark.parametrize("n_boot", [0, 50])
def test_bootstrap_setting(tmp_path, n_boot):
    p = _write(synthetic_trials("exp1", "m", 10, 3, 7), tmp_path / "t.parquet")
    out = summarise_experiment([p], tmp_path / "s.json", n_boot=n_boot, seed=1)
    boot = out["cells"][0]["metrics"]["esr_rate"].get("bootstrap")
    assert (boot is None) == (n_boot == 0)
    assert out["settings"]["bootstrap"] == (None if n_boot == 0 else {"n_resamples": 50, "seed": 1, "level": 0.95})


def test_one_latent_cell_has_no_bootstrap_interval_and_bounded_means():
    df = synthetic_trials("exp1", "m", 1, 3, 4)  # 5 trials of one latent
    [c] = summarise_table(df)
    m = c["metrics"]
    assert m["esr_rate"]["bootstrap"] == [None, None] and "cluster" in m["esr_rate"]["bootstrap_note"]
    lo, hi = m["first_score"]["ci"]
    assert 0 <= lo <= m["first_score"]["mean"] <= hi <= 100 and m["first_score"]["bounds"] == [0.0, 100.0]
    assert m["msi_all"]["bounds"] == [-100.0, 100.0]

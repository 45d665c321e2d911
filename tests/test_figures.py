"""Figures are written (PNG + JSON sidecar holding the plotted numbers), and the figure stages read trials tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esr.figures import (
    ablation_figure,
    empty_figure,
    esr_by_model_figure,
    figure_ablation,
    figure_boost_sweep,
    figure_esr_by_model,
    figure_meta_prompt,
    meta_prompt_figure,
    sweep_figure,
    sweep_table,
)
from esr.metrics import summarise
from esr.trials import write_trials

from helpers import graded_row


def _trials(
    model: str, n_latents: int, p_multi: float, seed: int, experiment: str = "exp1", boosts=(1.0,), **extra
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for lat in range(n_latents):
        for b in boosts:
            for j in range(5):
                k = 2 if rng.random() < p_multi else 1
                scores = [float(rng.integers(0, 101)) for _ in range(k)]
                rows.append(
                    graded_row(
                        f"{model}-{lat}-{b}-{j}",
                        experiment,
                        model,
                        lat,
                        "l",
                        b,
                        j,
                        "p",
                        j,
                        scores=scores,
                        response="an answer",
                        **extra,
                    )
                )
    return pd.DataFrame(rows)


def _read_sidecar(png):
    assert png.exists() and png.stat().st_size > 1000
    return json.loads(png.with_suffix(".json").read_text())


def test_fig2(tmp_path):
    df = pd.concat([_trials("big", 20, 0.2, 0), _trials("small", 20, 0.02, 1)])
    side = figure_esr_by_model(df, tmp_path / "fig2.png", model_order=["big", "small"])
    d = _read_sidecar(tmp_path / "fig2.png")
    assert d == json.loads(json.dumps(side))
    big = summarise(df[df["model"] == "big"])
    m0 = d["models"][0]
    assert m0["model"] == "big" and m0["n"] == big.n
    assert (m0["multi"]["k"], m0["esr"]["k"]) == (big.multi.k, big.esr.k)
    assert m0["esr"]["pct"] == pytest.approx(100 * big.esr.estimate)
    assert sum(m0["hist_counts"]) == big.multi.k and len(d["bin_edges"]) == 32


def test_fig3(tmp_path):
    df = _trials("m", 10, 0.1, 2, experiment="exp2", boosts=(0.0, 2.0, 4.0, 6.0))
    df["boost_level"] = [f"global:{(b - 3.0) / 2.0:+.2f}sd" for b in df["boost"]]  # levels at mean 3, SD 2
    df["threshold"] = 3.0
    table = sweep_table(df)
    assert list(table["boost_sigma"]) == [-1.5, -0.5, 0.5, 1.5]
    assert table["boost_rel"].tolist() == pytest.approx([0, 2 / 3, 4 / 3, 2])
    figure_boost_sweep(table, tmp_path / "fig3.png", model="m")
    d = _read_sidecar(tmp_path / "fig3.png")
    assert [p["n"] for p in d["curves"]["multi"]] == [50] * 4
    assert [p["k"] for p in d["curves"]["esr"]] == table["esr_k"].tolist()


def test_fig4_and_fig5(tmp_path):
    base = summarise(_trials("m", 10, 0.1, 3))
    variant = summarise(_trials("m", 10, 0.3, 4, prompt_variant="self_monitor"))
    figure_meta_prompt([("baseline", base), ("self_monitor", variant)], tmp_path / "fig4.png")
    d4 = _read_sidecar(tmp_path / "fig4.png")
    assert d4["panels"]["multi"][1]["k"] == variant.multi.k
    conds = [
        ("baseline", base),
        ("otd_paper_26", summarise(_trials("m", 10, 0.05, 5))),
        ("random_0", summarise(_trials("m", 10, 0.1, 6))),
    ]
    figure_ablation(conds, tmp_path / "fig5.png", model="m", interval="wald")
    d5 = _read_sidecar(tmp_path / "fig5.png")
    assert set(d5["panels"]) == {"first_score", "multi", "esr"}
    assert d5["panels"]["first_score"][0]["mean"] == pytest.approx(base.first_score.mean)
    assert d5["panels"]["esr"][2]["n"] == 50 and d5["interval"] == "wald"


# --------------------------------------------------------------------------------------- figure stages


def _table(df, path):
    write_trials(path, df, "graded")
    return path


def test_esr_by_model_stage_reads_the_tables(tmp_path):
    big, small = _trials("big", 20, 0.2, 0), _trials("small", 20, 0.02, 1)
    paths = [_table(big, tmp_path / "big.parquet"), _table(small, tmp_path / "small.parquet")]
    side = esr_by_model_figure(paths, tmp_path / "fig2.png", ["small", "big"])
    assert side == figure_esr_by_model(
        pd.concat([big, small], ignore_index=True), tmp_path / "again.png", model_order=["small", "big"]
    ) | {"figure": "fig2.png"}
    assert [m["model"] for m in _read_sidecar(tmp_path / "fig2.png")["models"]] == ["small", "big"]


def test_ablation_and_meta_prompt_stages(tmp_path):
    exp1 = _table(_trials("m", 10, 0.1, 3), tmp_path / "exp1.parquet")
    sets = [
        _trials("m", 10, p, seed, "exp3", condition=name, ablation_set=name, ablate=latents).assign(
            trial_id=lambda d, name=name: d["trial_id"] + name
        )
        for name, p, seed, latents in (("otd", 0.05, 5, (1, 2)), ("small", 0.3, 6, (1,)))
    ]
    exp3 = _table(pd.concat(sets, ignore_index=True), tmp_path / "exp3.parquet")
    d5 = ablation_figure("m", exp1, {"exp3": exp3, "exp10": None}, tmp_path / "fig5.png")
    assert d5["conditions"] == ["exp1: no ablation", "exp3: otd", "exp3: small"]
    assert d5["panels"]["multi"][0]["k"] == summarise(pd.read_parquet(exp1)).multi.k
    variants = pd.concat(
        [
            _trials("m", 10, 0.3, 4, "exp5", condition=v, prompt_variant=v).assign(
                trial_id=lambda d, v=v: d["trial_id"] + v
            )
            for v in ("self_monitor", "plain")
        ]
    )
    exp5 = _table(variants, tmp_path / "exp5.parquet")
    d4 = meta_prompt_figure("m", exp1, exp5, tmp_path / "fig4.png")
    assert d4["conditions"] == ["exp1: no meta-prompt", "plain", "self_monitor"]
    assert d4["panels"]["esr"][2]["k"] == summarise(variants[variants["prompt_variant"] == "self_monitor"]).esr.k


def test_sweep_stage(tmp_path):
    df = _trials("m", 10, 0.1, 2, experiment="exp2", boosts=(0.0, 2.0))
    df["boost_level"] = df["boost"].map({0.0: "global:-1.00sd", 2.0: "relative:1"})
    df["threshold"] = 2.0
    d = sweep_figure("m", _table(df, tmp_path / "exp2.parquet"), tmp_path / "fig3.png")
    assert d["level"] == ["global:-1.00sd", "relative:1"] and d["boost_sigma"] == [-1.0, None]
    assert d["boost_rel"] == [0.0, 1.0]


def test_not_run_figures_are_honest(tmp_path):
    exp1 = _table(_trials("m", 5, 0.1, 3), tmp_path / "exp1.parquet")
    for name, draw in (
        ("fig3", lambda p: sweep_figure("m", None, p)),
        ("fig4", lambda p: meta_prompt_figure("m", exp1, None, p)),
        ("fig5", lambda p: ablation_figure("m", exp1, {}, p)),
    ):
        side = draw(tmp_path / f"{name}.png")
        d = _read_sidecar(tmp_path / f"{name}.png")
        assert d == side and d["kind"] == "empty"
        assert d["message"].endswith(": not run in this configuration") and "m" in d["message"]
    assert "exp1" not in json.dumps(_read_sidecar(tmp_path / "fig4.png"))  # exp1 is not drawn in exp5's place
    d = empty_figure(tmp_path / "e.png", "no self-correction episodes")
    assert (
        _read_sidecar(tmp_path / "e.png")
        == d
        == {"figure": "e.png", "kind": "empty", "message": "no self-correction episodes"}
    )

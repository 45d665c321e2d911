"""Figures are written (PNG + JSON sidecar holding the plotted numbers)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esr.figures import figure_ablation, figure_boost_sweep, figure_esr_by_model, figure_meta_prompt, sweep_table
from esr.metrics import summarise
from esr.records import Attempt, Trial


def _trials(model: str, n_latents: int, p_multi: float, seed: int, experiment: str = "exp1",
            boosts=(1.0,), **extra) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for lat in range(n_latents):
        for b in boosts:
            for j in range(5):
                k = 2 if rng.random() < p_multi else 1
                scores = [float(rng.integers(0, 101)) for _ in range(k)]
                rows.append(Trial(f"{model}-{lat}-{b}-{j}", experiment, model, lat, "l", b, j, "p", j,
                                  attempts=[Attempt("x", s) for s in scores], response="an answer", **extra).to_row())
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
    table = sweep_table(df, mu=3.0, sigma=2.0, thresholds={lat: 3.0 for lat in range(10)})
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
    conds = [("baseline", base), ("otd_paper_26", summarise(_trials("m", 10, 0.05, 5))),
             ("random_0", summarise(_trials("m", 10, 0.1, 6)))]
    figure_ablation(conds, tmp_path / "fig5.png", model="m", interval="wald")
    d5 = _read_sidecar(tmp_path / "fig5.png")
    assert set(d5["panels"]) == {"first_score", "multi", "esr"}
    assert d5["panels"]["first_score"][0]["mean"] == pytest.approx(base.first_score.mean)
    assert d5["panels"]["esr"][2]["n"] == 50 and d5["interval"] == "wald"

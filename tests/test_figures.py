"""Figures are written (PNG + JSON sidecar holding the plotted numbers), and the figure stages read trials tables."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from esr import figures
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


# --------------------------------------------------------------------------------------- readability


MODEL_NAMES = ["llama-3.3-70b", "llama-3.1-8b", "gemma-2-27b", "gemma-2-9b", "gemma-2-2b", "smollm2-135m-instruct"]


def _visible_texts(fig):
    """Every drawn, non-empty Text artist of a figure: titles, axis labels, tick labels, texts, legend entries."""
    fig.canvas.draw()
    texts = list(fig.texts) + ([fig._suptitle] if fig._suptitle is not None else [])
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            texts.append(axis.get_offset_text())
            for tick in axis._update_ticks():
                texts += [tick.label1, tick.label2]
        if ax.get_legend() is not None:
            texts += list(ax.get_legend().get_texts())
    unique = list({id(t): t for t in texts}.values())  # the suptitle is also in fig.texts
    return [t for t in unique if t.get_visible() and t.get_text().strip()]


def _overlaps(fig):
    renderer = fig.canvas.get_renderer()
    texts = _visible_texts(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    bad = []
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1 :]:
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if w > 1 and h > 1:  # more than a pixel in both directions
                bad.append((ta, tb))
    return bad


def _panel_texts(ax):
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("n_models", [1, 2, 6])
def test_fig2_readable_with_1_to_6_models(n_models):
    names = MODEL_NAMES[:n_models]
    df = pd.concat([_trials(m, 6, 0.3 if i % 2 else 0.05, i) for i, m in enumerate(names)], ignore_index=True)
    fig, side = figures._draw_esr_by_model(df, names)
    try:
        assert _overlaps(fig) == []
        assert len(side["models"]) == n_models
        kn = [t for t in _panel_texts(fig.axes[2]) if "/" in t]
        assert len(kn) == n_models  # one k/n label per model, in the label column
    finally:
        plt.close(fig)


def test_fig2_empty_histogram_says_why():
    df = _trials("m", 4, 0.0, 0)  # no multi-attempt trial
    fig, side = figures._draw_esr_by_model(df, ["m"])
    try:
        assert any("no multi-attempt trials" in t for t in _panel_texts(fig.axes[0]))
        assert _overlaps(fig) == []
    finally:
        plt.close(fig)


@pytest.mark.parametrize("n_levels", [1, 2, 6])
def test_fig3_readable_with_1_to_6_levels(n_levels):
    boosts = tuple(float(b) for b in range(n_levels))
    df = _trials("m", 3, 0.2, 2, experiment="exp2", boosts=boosts)
    df["boost_level"] = [f"global:{b - 1:+.2f}sd" for b in df["boost"]]
    df["threshold"] = 1.0
    fig, _ = figures._draw_boost_sweep(sweep_table(df), model="m")
    try:
        assert _overlaps(fig) == []
    finally:
        plt.close(fig)


def test_fig3_first_score_intervals_stay_in_0_100_and_empty_panels_say_why():
    rows = []
    for level, score in (("global:-1.00sd", 0.0), ("global:+1.00sd", 100.0)):
        for j in range(3):
            rows.append(graded_row(f"{level}-{j}", "exp2", "m", j, "l", 1.0, j, "p", j, scores=[score], response="x"))
    df = pd.DataFrame(rows)
    df["boost_level"] = ["global:-1.00sd"] * 3 + ["global:+1.00sd"] * 3
    df["threshold"] = 1.0
    fig, side = figures._draw_boost_sweep(sweep_table(df), model="m")
    try:
        for p in side["curves"]["first_score"]:
            assert 0.0 <= p["ci"][0] <= p["mean"] <= p["ci"][1] <= 100.0 and p["ci"][1] > p["ci"][0]
        assert any("no multi-attempt trials" in t for t in _panel_texts(fig.axes[1]))  # improvement: no multi
        assert _overlaps(fig) == []
    finally:
        plt.close(fig)


@pytest.mark.parametrize("n_conditions", [1, 2, 6])
def test_fig4_and_fig5_readable_with_1_to_6_conditions(n_conditions):
    conds = [
        (f"exp3: {name}" if i else "exp1: no ablation", summarise(_trials("m", 4, 0.1 + 0.05 * i, 10 + i)))
        for i, name in enumerate(["base", "discovered_separability", "discovered_frequency", "random_0", "r_1", "r2"])
    ][:n_conditions]
    for draw in (
        lambda: figures._draw_condition_bars(
            conds, "fig5", "Latent ablation m", "wilson", ("first_score", "multi", "esr")
        ),
        lambda: figures._draw_condition_bars(conds, "fig4", "Meta-prompts m", "wilson", ("multi", "esr")),
    ):
        fig, side = draw()
        try:
            assert _overlaps(fig) == []
            for p in side["panels"].get("first_score", []):
                assert 0.0 <= p["ci"][0] <= p["ci"][1] <= 100.0
        finally:
            plt.close(fig)


def test_condition_panel_without_trials_says_why():
    from esr.metrics import summarise as summ

    empty = summ(_trials("m", 2, 0.1, 0).assign(error="judge failed"))  # every trial excluded
    fig, _ = figures._draw_condition_bars([("exp1", empty)], "fig4", "t", "wilson", ("multi", "esr"))
    try:
        assert all(any("no included trials" in t for t in _panel_texts(ax)) for ax in fig.axes)
    finally:
        plt.close(fig)


def test_overlap_check_finds_overlapping_labels():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.text(0.5, 0.5, "185/4877", transform=ax.transAxes)
    ax.text(0.52, 0.5, "llama-3.3-70b", transform=ax.transAxes)
    try:
        assert _overlaps(fig) == [("185/4877", "llama-3.3-70b")]
    finally:
        plt.close(fig)

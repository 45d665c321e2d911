"""Tests of esr.latents: labels IO, both relevance-filter variants, filter counts on a crafted table, seeded
determinism of the selection, prompt/seed assignment and the selection file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esr.latents import (
    FilterCounts,
    SelectionError,
    SelectionSettings,
    assign_trials,
    dead_mask,
    derive_rng,
    derive_seed,
    firing_frequency,
    grade_concreteness,
    is_unlabeled,
    labels_dict,
    read_labels,
    read_selection,
    relevance_pass_mask,
    select_latents,
    write_selection,
)


def test_is_unlabeled():
    for v in (None, float("nan"), "", "   ", "feature_12", " feature_0 "):
        assert is_unlabeled(v), v
    for v in ("dogs", "feature extraction", "feature_x"):
        assert not is_unlabeled(v), v


def test_read_labels_handles_reference_columns_and_empty_labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('index_in_sae,label,extra\n0,dogs,a\n1,,b\n2,feature_2,c\n3,NA,d\n4,"beer, coffee",e\n')
    df = read_labels(path)
    assert list(df.columns) == ["latent", "label", "extra"]
    assert df["label"].tolist() == ["dogs", None, None, "NA", "beer, coffee"]  # "NA" is a word, not a missing value
    path.write_text("latent,label\n0,a\n0,b\n")
    with pytest.raises(SelectionError, match="latent 0 appears more than once"):
        read_labels(path)
    path.write_text("idx,label\n0,a\n")
    with pytest.raises(SelectionError, match="no 'latent' column"):
        read_labels(path)


# ---------------------------------------------------------------------------------------------------------------
# relevance


def crafted_acts() -> np.ndarray:
    # 3 prompts x 8 latents. Latent 7 never fires; latent 6 fires weakly on prompt 2 only.
    return np.array(
        [
            [5.0, 4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 9.0, 8.0, 1.0, 0.0, 0.0],
            [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
        ]
    )


def test_relevance_zero_on_prompts():
    keep = relevance_pass_mask(crafted_acts(), "zero_on_prompts")
    assert np.flatnonzero(keep).tolist() == [7]


def test_relevance_top_k_per_prompt():
    keep = relevance_pass_mask(crafted_acts(), "top100_on_prompt_tokens", top_k=2)
    # prompt 0 top-2: {0, 1}; prompt 1 top-2: {3, 4}; prompt 2 top-2 with act > 0: {0, 6}
    assert np.flatnonzero(~keep).tolist() == [0, 1, 3, 4, 6]
    keep100 = relevance_pass_mask(crafted_acts(), "top100_on_prompt_tokens")  # top-100 never holds zero activations
    assert np.flatnonzero(keep100).tolist() == [7]
    # the old name is a deprecated alias: the same filter, with a warning saying what it ranks on
    with pytest.warns(DeprecationWarning, match="prompt's tokens, not on unsteered responses"):
        old = relevance_pass_mask(crafted_acts(), "top100_per_prompt", top_k=2)
    assert (old == keep).all()
    assert relevance_pass_mask(crafted_acts(), "none").all()
    with pytest.raises(SelectionError, match="relevance_filter"):
        relevance_pass_mask(crafted_acts(), "top10")
    with pytest.raises(SelectionError, match="shape"):
        relevance_pass_mask(np.zeros(8), "zero_on_prompts")


def test_dead_mask():
    df = pd.DataFrame({"latent": [0, 2], "label": ["a", ""], "frequency": [0.01, 0.0]})
    assert dead_mask(firing_frequency(df, 3), 3).tolist() == [False, False, True]  # missing latent 1: unknown
    assert dead_mask(np.array([0.0, 1e-4, 0.0]), 3).tolist() == [True, False, True]
    assert dead_mask(None, 2).tolist() == [False, False]
    with pytest.raises(SelectionError, match="shape"):
        dead_mask(np.zeros(4), 3)


def test_grade_concreteness_dedupes_and_validates():
    seen = []

    def grader(labels):
        seen.append(list(labels))
        return [80.0 if lab == "dogs" else None for lab in labels]

    assert grade_concreteness(["dogs", "dogs", "if"], grader) == {"dogs": 80.0, "if": None}
    assert seen == [["dogs", "if"]]
    with pytest.raises(SelectionError, match="2 scores for 1"):
        grade_concreteness(["a"], lambda labels: [1.0, 2.0])
    with pytest.raises(SelectionError, match="'a'"):
        grade_concreteness(["a"], lambda labels: [150.0])


# ---------------------------------------------------------------------------------------------------------------
# selection


D_SAE = 12
CRAFTED_LABELS = {
    0: "dogs",
    1: "",
    2: "feature_2",
    3: "beer",
    4: "if",
    5: "sodium",
    6: "error-label",
    7: "knee",
    8: "streets",
    9: "onions",
    10: "coffee",
}  # latent 11 missing from the table


def crafted_grader(calls=None):
    scores = {
        "dogs": 90.0,
        "beer": 80.0,
        "if": 10.0,
        "sodium": 95.0,
        "error-label": None,
        "knee": 70.0,
        "streets": 64.9,
        "onions": 65.0,
        "coffee": 85.0,
    }

    def grader(labels):
        if calls is not None:
            calls.extend(labels)
        return [scores[lab] for lab in labels]

    return grader


def crafted_inputs():
    acts = np.zeros((3, D_SAE))
    acts[0, 5] = 2.0  # sodium fires on a prompt: relevance_fail
    acts[2, 9] = 0.1  # onions too
    freq = np.full(D_SAE, 0.01)
    freq[10] = 0.0  # coffee is dead
    return acts, freq


def test_filter_counts_on_crafted_table():
    acts, freq = crafted_inputs()
    calls: list[str] = []
    settings = SelectionSettings(n_latents=10, trials_per_latent=2, relevance_filter="zero_on_prompts")
    sel = select_latents(
        model="m",
        seed=1,
        settings=settings,
        d_sae=D_SAE,
        labels=CRAFTED_LABELS,
        grader=crafted_grader(calls),
        prompt_acts=acts,
        n_prompts=3,
        firing_freq=freq,
    )
    c = sel.counts
    assert c.candidates == 12
    assert c.unlabeled == 3  # 1 (empty), 2 (placeholder), 11 (not in the table)
    assert c.dead == 1 and c.relevance_fail == 2
    assert c.concreteness_error == 1  # the grader gave no score: counted, not silently 0
    assert c.concreteness_fail == 2  # "if" 10, "streets" 64.9
    assert c.passed == c.selected == 3  # dogs, beer, knee (65.0 "onions" failed relevance first)
    assert sorted(s.latent for s in sel.latents) == [0, 3, 7]
    assert sorted(calls) == sorted(["dogs", "beer", "if", "error-label", "knee", "streets"])  # only cheap survivors
    assert c.graded == 6
    assert (
        sum(
            getattr(c, k)
            for k in ("unlabeled", "dead", "relevance_fail", "concreteness_error", "concreteness_fail", "passed")
        )
        == c.candidates
    )
    assert sel.rejected["concreteness_error"] == [6]
    assert sel.shortfall == 7
    assert {s.latent: s.concreteness for s in sel.latents} == {0: 90.0, 3: 80.0, 7: 70.0}


def test_top100_variant_changes_counts():
    acts, freq = crafted_inputs()
    acts[1, :] = np.arange(D_SAE)  # prompt 1 activates every latent but 0
    settings = SelectionSettings(
        n_latents=10, trials_per_latent=2, relevance_filter="top100_on_prompt_tokens", relevance_top_k=2
    )
    sel = select_latents(
        model="m",
        seed=1,
        settings=settings,
        d_sae=D_SAE,
        labels=CRAFTED_LABELS,
        grader=crafted_grader(),
        prompt_acts=acts,
        n_prompts=3,
        firing_freq=freq,
    )
    # relevant (top-2 per prompt): prompt0 {5}, prompt1 {11, 10}, prompt2 {9}; 10 and 11 fail earlier filters
    assert sel.counts.relevance_fail == 2
    assert sorted(s.latent for s in sel.latents) == [0, 3, 7]


def big_inputs(d_sae=2000, seed=0):
    rng = np.random.default_rng(seed)
    labels = {j: (f"concept {j}" if rng.random() < 0.8 else "") for j in range(d_sae)}
    acts = np.where(rng.random((4, d_sae)) < 0.3, rng.random((4, d_sae)), 0.0)
    freq = np.where(rng.random(d_sae) < 0.05, 0.0, 0.01)
    grades = {lab: float(rng.integers(0, 101)) for lab in labels.values() if lab}
    return labels, acts, freq, (lambda labs: [grades[lab] for lab in labs])


def test_selection_is_deterministic_per_seed_and_differs_across_seeds():
    labels, acts, freq, grader = big_inputs()
    settings = SelectionSettings(n_latents=50, trials_per_latent=5)

    def run(seed, model="m"):
        return select_latents(
            model=model,
            seed=seed,
            settings=settings,
            d_sae=2000,
            labels=labels,
            grader=grader,
            prompt_acts=acts,
            n_prompts=36,
            firing_freq=freq,
        )

    a, b, c = run(7), run(7), run(8)
    assert a.to_dict() == b.to_dict()
    assert len(a.latents) == 50
    assert [s.latent for s in a.latents] != [s.latent for s in c.latents]
    assert [s.latent for s in run(7, model="other").latents] != [s.latent for s in a.latents]
    for s in a.latents:
        assert len(set(s.prompt_ids)) == 5 and all(0 <= p < 36 for p in s.prompt_ids)
        assert len(s.trial_seeds) == 5 and all(0 <= x < 2**31 - 1 for x in s.trial_seeds)
        assert acts[:, s.latent].max() == 0 and freq[s.latent] > 0 and s.concreteness >= 65
    assert len(a.trials()) == 250
    # a latent's prompts and seeds depend only on (seed, model, latent)
    shared = set(s.latent for s in a.latents) & set(s.latent for s in c.latents)
    for j in shared:
        sa = next(s for s in a.latents if s.latent == j)
        assert (sa.prompt_ids, sa.trial_seeds) == assign_trials(7, "m", j, 36, 5)


def test_candidate_multiplier_limits_the_draw():
    labels, acts, freq, grader = big_inputs()
    settings = SelectionSettings(n_latents=50, candidate_multiplier=3)
    sel = select_latents(
        model="m",
        seed=7,
        settings=settings,
        d_sae=2000,
        labels=labels,
        grader=grader,
        prompt_acts=acts,
        n_prompts=36,
        firing_freq=freq,
    )
    assert sel.counts.candidates == 150 and len(sel.latents) < 50 and sel.shortfall > 0
    lazy = select_latents(
        model="m",
        seed=7,
        settings=SelectionSettings(n_latents=50),
        d_sae=2000,
        labels=labels,
        grader=grader,
        prompt_acts=acts,
        n_prompts=36,
        firing_freq=freq,
    )
    # the lazy walk keeps the same candidate order, so the no-retry selection is its prefix
    assert [s.latent for s in lazy.latents][: len(sel.latents)] == [s.latent for s in sel.latents]


def test_selection_file_roundtrip(tmp_path):
    labels, acts, freq, grader = big_inputs()
    sel = select_latents(
        model="m",
        seed=3,
        settings=SelectionSettings(n_latents=10),
        d_sae=2000,
        labels=labels,
        grader=grader,
        prompt_acts=acts,
        n_prompts=36,
        firing_freq=freq,
    )
    path = write_selection(tmp_path / "sel" / "m.json", sel, provenance={"config_sha256": "abc"})
    back = read_selection(path)
    assert back.to_dict() == sel.to_dict()
    assert isinstance(back.counts, FilterCounts) and back.latents[0].prompt_ids == sel.latents[0].prompt_ids


def test_selection_input_errors(tmp_path):
    settings = SelectionSettings(n_latents=2, trials_per_latent=5)
    with pytest.raises(SelectionError, match="trials_per_latent"):
        select_latents(
            model="m",
            seed=0,
            settings=settings,
            d_sae=4,
            labels={0: "dogs"},
            grader=lambda labs: [90.0] * len(labs),
            prompt_acts=np.zeros((2, 4)),
            n_prompts=3,
        )
    with pytest.raises(SelectionError, match="latent 9 outside"):
        select_latents(
            model="m",
            seed=0,
            settings=settings,
            d_sae=4,
            labels={9: "dogs"},
            grader=lambda labs: [],
            prompt_acts=np.zeros((2, 4)),
            n_prompts=10,
        )
    with pytest.raises(SelectionError, match="expected d_sae = 4"):
        select_latents(
            model="m",
            seed=0,
            settings=settings,
            d_sae=4,
            labels={0: "dogs"},
            grader=lambda labs: [],
            prompt_acts=np.zeros((2, 5)),
            n_prompts=10,
        )
    with pytest.raises(SelectionError, match="selection.relevance_filter"):
        SelectionSettings(relevance_filter="top100")
    with pytest.warns(DeprecationWarning, match="top100_on_prompt_tokens"):
        assert SelectionSettings(relevance_filter="top100_per_prompt").relevance_filter == "top100_on_prompt_tokens"
    with pytest.raises(SelectionError, match="selection.n_latents_per_model.m"):
        SelectionSettings(n_latents_per_model={"m": 0})
    from esr.config import ConfigError, load_config
    from esr.testing import write_tiny_workflow

    with pytest.raises(ConfigError, match="selection.n_latent"):
        load_config(write_tiny_workflow(tmp_path), {"selection": {"n_latent": 5}})


def test_seed_derivation():
    assert derive_seed(1, "m", "candidates") == derive_seed(1, "m", "candidates")
    assert derive_seed(1, "m", "candidates") != derive_seed(1, "m", "prompts:0")
    assert derive_rng(1, "m", "x").integers(1 << 30) == derive_rng(1, "m", "x").integers(1 << 30)
    assert labels_dict(pd.DataFrame({"latent": [0, 1], "label": ["a", ""]})) == {0: "a", 1: None}


def test_n_latents_per_model_overrides_the_block():
    from esr.latents import model_selection_settings

    block = {"n_latents": 500, "trials_per_latent": 5, "n_latents_per_model": {"big": 1000}}
    assert model_selection_settings(block, "big").n_latents == 1000
    assert model_selection_settings(block, "small").n_latents == 500
    assert model_selection_settings(block, "big").trials_per_latent == 5
    settings = model_selection_settings(
        {"n_latents": 1, "trials_per_latent": 1, "relevance_filter": "none", "n_latents_per_model": {"big": 2}}, "big"
    )
    sel = select_latents(
        model="big",
        seed=0,
        settings=settings,
        d_sae=4,
        labels={0: "dogs", 1: "cats", 2: "fish"},
        grader=lambda labs: [90.0] * len(labs),
        prompt_acts=None,
        n_prompts=10,
    )
    assert len(sel.latents) == 2 and sel.shortfall == 0

"""Episodes: selection, judge offsets, restart-phrase alignment, char -> token mapping without header off-by-one."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from esr import episodes as E

from helpers import graded_row

OFF = "Bread is like a car tire. Tires need air. "
PHRASE = "Wait, that's not right. "
ON = "To bake bread, mix flour and water."
RESPONSE = OFF + PHRASE + ON


def word_spans(text: str, base: int = 0) -> list[tuple[int, int]]:
    """Spans of a toy tokenizer: words and punctuation, each token absorbing its leading space."""
    return [(base + m.start(), base + m.end()) for m in re.finditer(r"\s*(\w+|'\w+|[^\w\s])", text)]


def trial(tid: str, scores: list[float | None], latent: int | None = 5, boost: float = 3.0, **kw) -> dict:
    """A graded trials-table row (``helpers.graded_row``)."""
    return graded_row(
        tid, "exp1", "m", latent, "x", boost, 0, "p", 0, response=kw.pop("response", RESPONSE), scores=scores, **kw
    )


def ids(trials) -> list[str]:
    return [t["trial_id"] for t in trials]


def test_select_self_correction_and_baseline(tmp_path):
    ts = [
        trial("a", [10, 80]),
        trial("b", [80, 10]),
        trial("c", [10, 20, 90]),
        trial("d", [10, 80], error="x"),
        trial("e", [10, 80], ablation_set="otd"),
        trial("f", [30]),
        trial("g", [90]),
        trial("h", [90], latent=None, boost=0.0),
        trial("i", [10, None, 80]),
    ]
    assert ids(E.select_self_correction(ts)) == ["a", "i"]
    assert ids(E.select_self_correction(ts, exclude_ablation=False)) == ["a", "e", "i"]
    assert ids(E.select_baseline(ts)) == ["h"]
    assert ids(E.select_baseline(ts, "steered_on_topic")) == ["g"]
    many = [trial(f"u{i}", [90], latent=None, boost=0.0) for i in range(20)]
    s1, s2 = E.select_baseline(many, n=5, seed=1), E.select_baseline(many, n=5, seed=1)
    assert ids(s1) == ids(s2) and len(s1) == 5
    # rows read back from a parquet trials table (list columns come back as arrays)
    pd.DataFrame(ts[:2]).to_parquet(tmp_path / "t.parquet", index=False)
    rows = pd.read_parquet(tmp_path / "t.parquet").to_dict("records")
    assert ids(E.select_self_correction(rows)) == ["a"]
    with pytest.raises(ValueError, match="baseline source"):
        E.select_baseline(ts, "steered")


def test_validate_and_parse_offsets():
    assert E.validate_char_offsets(0, 5, 9, 10) == E.CharBoundaries(0, 5, 9)
    assert E.validate_char_offsets(-1, 5, 9, 10) is None
    assert E.validate_char_offsets(0, 6, 5, 10) is None
    assert E.validate_char_offsets(0, 5, 10, 10) is None
    ok = {"off_topic_char_start": 0, "correction_char_start": 42, "on_topic_char_start": 66}
    assert E.parse_judge_offsets(ok, RESPONSE) == E.CharBoundaries(0, 42, 66)
    assert E.parse_judge_offsets({"off_topic_char_start": 0}, RESPONSE) is None
    assert E.parse_judge_offsets({**ok, "on_topic_char_start": "x"}, RESPONSE) is None
    assert E.parse_judge_offsets({**ok, "on_topic_char_start": 2.5}, RESPONSE) is None


@pytest.mark.parametrize(
    "phrase",
    [
        "Wait, that's not right.",
        "Let me start over!",
        "Sorry, I got off track.",
        "let me try again:",
        "Actually, I made a mistake.",
    ],
)
def test_find_restart_phrases(phrase):
    text = OFF + phrase + "  " + ON
    b = E.find_restart(text)
    assert b == E.CharBoundaries(0, len(OFF), len(OFF) + len(phrase) + 2)
    assert text[b.on_topic :].startswith("To bake")


def test_find_restart_edge_cases():
    assert E.find_restart("No restart here at all.") is None
    curly = "Cars are red. Wait, that\u2019s not right. Bread needs flour."
    assert curly[E.find_restart(curly).on_topic :] == "Bread needs flour."
    assert E.find_restart("Let me start over.") is None  # nothing before it, nothing after it
    # a phrase at the very start is skipped; the next one is used
    text = "Let me try again. Cars go fast. Let me start over. Bread needs flour."
    b = E.find_restart(text)
    assert text[b.correction :].startswith("Let me start over") and text[b.on_topic :] == "Bread needs flour."


def test_char_to_token_and_mapping():
    spans = word_spans(RESPONSE)
    b = E.find_restart(RESPONSE)
    tb = E.map_boundaries(b, spans)
    toks = [RESPONSE[s:e] for s, e in spans]
    assert toks[tb.correction].strip() == "Wait"
    assert toks[tb.on_topic].strip() == "To"
    assert toks[tb.correction - 1] == "."
    assert tb.off_topic == 0 and tb.n_tokens == len(spans)
    labels = tb.region_labels()
    assert labels[: tb.correction] == ["off_topic"] * tb.correction
    assert labels[tb.correction : tb.on_topic] == ["correction"] * 7  # Wait , that 's not right .
    assert labels[tb.on_topic :] == ["on_topic"] * (len(spans) - tb.on_topic)
    assert E.char_to_token(spans, len(RESPONSE) + 5) == len(spans)
    # a boundary on the space before a word maps to that word's token (spans absorb leading spaces)
    assert E.char_to_token([(0, 3), (3, 7)], 3) == 1
    assert E.char_to_token([(0, 0), (0, 3)], 0) == 1  # zero-width special token never matches


def test_pre_region_when_off_topic_starts_later():
    tb = E.TokenBoundaries(2, 4, 5, 7)
    assert tb.region_labels() == ["pre", "pre", "off_topic", "off_topic", "correction", "on_topic", "on_topic"]
    assert tb.region_sizes() == {"pre": 2, "off_topic": 2, "correction": 1, "on_topic": 2}


def test_response_tokens_in_rendered_conversation_no_header_off_by_one():
    header = (
        "<|start_header_id|>user<|end_header_id|>\n\nExplain bread<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    start, end = len(header), len(header) + len(RESPONSE)
    specials = [(m.start(), m.end()) for m in re.finditer(r"<\|[a-z_]+\|>|\n\n|user|assistant|Explain bread", header)]
    spans = [(0, 0)] + specials + word_spans(RESPONSE, base=start) + [(end, end + len("<|eot_id|>"))]
    first, stop, rel = E.response_token_spans(spans, start, end)
    assert first == 1 + len(specials) and stop == len(spans) - 1  # BOS, header and "\n\n" out; eot out
    assert rel == word_spans(RESPONSE)
    tb = E.map_boundaries(E.CharBoundaries(0, len(OFF), len(OFF + PHRASE)), rel)
    toks = [RESPONSE[s:e] for s, e in rel]
    assert toks[tb.correction].strip() == "Wait" and toks[tb.on_topic].strip() == "To"
    assert toks[tb.off_topic] == "Bread"


def test_make_episode_both_methods():
    t = trial("a", [0, 75])
    spans = word_spans(RESPONSE)
    e1 = E.make_episode(t, "ep_0001", method="restart_phrase", spans=spans)
    e2 = E.make_episode(
        t,
        "ep_0002",
        method="judge_offsets",
        spans=spans,
        judge_offsets={
            "off_topic_char_start": 0,
            "correction_char_start": len(OFF),
            "on_topic_char_start": len(OFF + PHRASE),
        },
    )
    assert e1.tokens == e2.tokens and e1.first_score == 0 and e1.last_score == 75 and e1.kind == "self_correction"
    assert e1.method == "restart_phrase" and e2.method == "judge_offsets"
    assert E.make_episode(trial("b", [0, 75], response="nothing to see"), "x", method="restart_phrase") is None
    with pytest.raises(ValueError):
        E.make_episode(t, "x", method="judge_offsets")
    b = E.Episode("bl_0001", "h", "baseline", "an answer", source="unsteered")
    assert b.region_labels(n_tokens=4) == ["baseline"] * 4


@pytest.mark.parametrize(
    "phrase", ["Wait, that's not quite right.", "Scratch that.", "Let's get back to your question."]
)
def test_episode_boundaries_use_the_judges_restart_detector(phrase):
    """exp9 aligns on the same restarts the offline judge splits attempts at (one detector, not a second list)."""
    from esr.judge.segmentation import find_restarts

    text = OFF + phrase + " " + ON
    b = E.find_restart(text)
    assert b is not None and text[b.correction :].startswith(phrase.split()[0]) and text[b.on_topic :] == ON
    assert [r.start for r in find_restarts(text)] == [b.correction]

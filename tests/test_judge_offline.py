"""The offline MiniLM judge (embedded default; an approximation) with the real bundled model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esr.judge import (
    DEFAULT_ANCHORS,
    OFFLINE_JUDGE_ID,
    Anchors,
    JudgeRequest,
    OfflineMiniLMJudge,
    build_judge,
    fit_anchors,
)

PROMPTS = [
    "Explain how to bake a loaf of bread.",
    "Explain how to change a flat tire on a car.",
    "Explain how to write a good cover letter.",
    "Explain how to set up a budget for the month.",
]
ANSWERS = [
    "Mix flour, water, yeast and salt into a dough. Knead it for ten minutes, let it rise for an hour, shape the "
    "loaf, let it rise again, then bake it in a hot oven at 220 C for about 35 minutes until the crust is golden.",
    "Park on flat ground and switch on the hazard lights. Loosen the lug nuts, raise the car with the jack, remove "
    "the flat tire, mount the spare wheel, tighten the lug nuts in a star pattern and lower the car.",
    "To write a good cover letter, address the hiring manager by name and open with the job you are applying for. "
    "In the letter, show two or three achievements that match the job description, explain why you want to join "
    "the company, and close the cover letter with a call to action.",
    "List your monthly income after tax, then your fixed costs such as rent and bills. Set amounts for food, "
    "transport and savings, track every expense during the month, and adjust the categories that overspend.",
]
OFF_TOPIC = (
    "The golden retriever wagged its tail and chased the other dogs across the park, barking happily at "
    "every squirrel and puppy it met along the muddy path."
)
RESTART = "Wait, that's not right. Let me start over."


class CountingEncoder:
    """Wraps the real model and counts encode calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.model.encode(*args, **kwargs)


DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def encoder():
    import torch

    torch.set_num_threads(1)
    from esr.judge.offline import load_encoder

    return CountingEncoder(load_encoder("cpu"))


def test_one_attempt_without_restart_and_scores(encoder):
    judge = OfflineMiniLMJudge(encoder=encoder, show_progress=False)
    on = judge.grade(PROMPTS[0], ANSWERS[0], "dogs")
    off = judge.grade(PROMPTS[0], OFF_TOPIC, "dogs")
    assert len(on.attempts) == 1 and len(off.attempts) == 1
    assert on.attempts[0].score >= 70 and off.attempts[0].score <= 20, (on.metadata, off.metadata)
    assert on.judge_id == OFFLINE_JUDGE_ID == "offline-minilm-relevance (approximation)"
    assert on.metadata["approximation"] is True and on.raw_text is None and on.ok


def test_restart_splits_into_low_then_high(encoder):
    judge = OfflineMiniLMJudge(encoder=encoder, show_progress=False)
    reqs = [JudgeRequest(p, f"{OFF_TOPIC} {RESTART} {a}", "dogs") for p, a in zip(PROMPTS, ANSWERS)]
    results = judge.grade_batch(reqs)
    for res in results:
        assert len(res.attempts) == 2
        first, last = res.scores
        assert first < 25 and last > 70 and last > first, res.metadata
        assert res.attempts[1].text.startswith("Wait, that's not right.")


def test_calibration_roundtrip_and_mapping(encoder, tmp_path):
    cal = fit_anchors(PROMPTS, ANSWERS, encoder=encoder)
    assert cal.cos_on > cal.on_min - 1e-9 and cal.cos_on > cal.off_max > cal.cos_off
    assert cal.n_prompts == 4
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Anchors.load(path) == cal
    assert DEFAULT_ANCHORS.score(0.086) == 0 and DEFAULT_ANCHORS.score(0.718) == 100
    assert DEFAULT_ANCHORS.score(-0.5) == 0 and DEFAULT_ANCHORS.score(0.99) == 100
    assert DEFAULT_ANCHORS.score(0.402) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        Anchors(cos_off=0.5, cos_on=0.4, source="bad")
    judge = build_judge(
        {"backend": "offline_minilm", "anchors": str(path), "cache_dir": None}, encoder=encoder, show_progress=False
    )
    assert judge.anchors == cal and judge.describe()["anchors"]["cos_on"] == cal.cos_on
    # several answers per prompt are accepted
    assert fit_anchors(PROMPTS[:2], [[ANSWERS[0], ANSWERS[0]], [ANSWERS[1]]], encoder=encoder).n_prompts == 2


def test_offline_cache_rerun_skips_model(encoder, tmp_path):
    cfg = {"backend": "offline_minilm", "cache_dir": str(tmp_path / "cache")}
    reqs = [JudgeRequest(p, a, "dogs", f"t{i}") for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))]
    first = build_judge(cfg, encoder=encoder, show_progress=False).grade_batch(reqs)
    before = encoder.calls
    judge = build_judge(cfg, encoder=encoder, show_progress=False)
    second = judge.grade_batch(reqs)
    assert encoder.calls == before and judge.stats.cache_hits == 4 and judge.stats.cache_misses == 0
    assert [r.scores for r in second] == [r.scores for r in first] and second[2].trial_id == "t2"
    assert second[0].metadata["approximation"] is True
    # other anchors are another cache identity
    other = build_judge({**cfg}, encoder=encoder, show_progress=False)
    other.anchors = Anchors(cos_off=0.0, cos_on=0.9, source="test")
    other.grade_batch(reqs[:1])
    assert other.stats.cache_misses == 1


# ------------------------------------------------------------------------------------- restart recognition
def _restart_cases():
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "restart_cases.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_restart_recognition_precision_recall_floors(encoder):
    """Labelled set (tests/data/restart_cases.jsonl, written for this test; 'heldout' rows were written after the
    margin was set): an answer with a restart must split into >= 2 attempts, one without must stay one attempt.
    Measured when written: all 114 P=1.00 R=0.88 (patterns alone R=0.25); held-out 24 P=1.00 R=0.50; with the
    meta-discourse cue words (restart-patterns-v3): all 114 P=1.00 R=0.91."""
    cases = _restart_cases()
    assert len(cases) >= 60 and {c["restart"] for c in cases} == {True, False}
    judge = OfflineMiniLMJudge(encoder=encoder, show_progress=False)
    results = judge.grade_now([JudgeRequest("Explain how to do it.", c["text"], "x") for c in cases])
    pred = [len(r.attempts) >= 2 for r in results]
    tp = sum(p and c["restart"] for p, c in zip(pred, cases))
    fp = sum(p and not c["restart"] for p, c in zip(pred, cases))
    fn = sum(c["restart"] and not p for p, c in zip(pred, cases))
    precision, recall = tp / max(1, tp + fp), tp / (tp + fn)
    assert precision >= 0.95 and recall >= 0.80, (precision, recall)
    held = [(p, c) for p, c in zip(pred, cases) if c.get("heldout")]
    assert not [c["text"] for p, c in held if p and not c["restart"]]  # no false restart on unseen elaboration


def _grade_cases(encoder, cases):
    judge = OfflineMiniLMJudge(encoder=encoder, show_progress=False)
    results = judge.grade_now([JudgeRequest(c.get("prompt", "Explain how to do it."), c["text"], "x") for c in cases])
    return [len(r.attempts) >= 2 for r in results]


def test_restart_recognition_on_a_second_writers_set(encoder):
    """40 cases written by a second author (tests/data/restart_cases_fresh.jsonl: 20 restarts, 20 elaborations with
    restart-like words such as 'wait until', 'sorry to repeat myself', 'going back to the first step'). Measured
    before the meta-discourse cue words were added: P=1.00 R=0.70; after: P=1.00 R=0.95 (no longer held out)."""
    cases = [json.loads(line) for line in (DATA / "restart_cases_fresh.jsonl").read_text().splitlines() if line]
    pred = _grade_cases(encoder, cases)
    tp = sum(p and c["restart"] for p, c in zip(pred, cases))
    fp = [c["text"] for p, c in zip(pred, cases) if p and not c["restart"]]
    assert not fp and tp / sum(c["restart"] for c in cases) >= 0.9, (tp, fp)


def test_no_restart_found_in_real_unsteered_smollm2_answers(encoder):
    """Precision on real text: SmolLM2-135M never restarts unsteered (0/48 by reading them), and its answers are full
    of numbered lists and 'Here is the process:' clauses that a looser detector takes for restarts (checking every
    clause, not only cue clauses, found 19/48)."""
    cases = [json.loads(line) for line in (DATA / "smollm2_unsteered_answers.jsonl").read_text().splitlines() if line]
    assert len(cases) == 48
    pred = _grade_cases(encoder, cases)
    assert not any(pred), [c["text"][:120] for p, c in zip(pred, cases) if p]


def test_issue_examples(encoder):
    judge = OfflineMiniLMJudge(encoder=encoder, show_progress=False)
    drift = "The tide rises twice a day as the moon pulls on the oceans. "
    restarts = [
        "Wait, that's not quite right - I drifted into talking about tides.",
        "Hmm, no, that's unrelated.",
        "I apologize, I made a mistake.",
        "Let's get back to your question.",
        "Scratch that.",
    ]
    answer = "To plan a party, start with a guest list and a budget."
    for phrase in restarts:
        res = judge.grade("Explain how to plan a party.", f"{drift}{phrase} {answer}", "tides")
        assert len(res.attempts) == 2, phrase
        assert res.attempts[1].text.startswith(phrase.split(",")[0].split(" ")[0]), res.attempts
        assert res.scores[1] > res.scores[0], res.metadata
    for elaboration in ["Actually, you can also hire a caterer.", "Let me explain the next step again."]:
        res = judge.grade("Explain how to plan a party.", f"{answer} {elaboration} Send invitations early.", "x")
        assert len(res.attempts) == 1, elaboration


def test_find_restarts_matches_the_offline_judge(encoder):
    """tests/test_workflow.py counts restarts with ``find_restarts``; it must agree with the judge's split."""
    from esr.judge.segmentation import RestartDetector, find_restarts

    detector = RestartDetector(encoder=encoder)
    text = f"{OFF_TOPIC} Sorry, I went off on a tangent there. {ANSWERS[0]}"
    found = find_restarts(text, detector)
    assert len(found) == 1 and text[found[0].start :].startswith("Sorry")
    res = OfflineMiniLMJudge(encoder=encoder, show_progress=False).grade(PROMPTS[0], text, "dogs")
    assert len(res.attempts) == 2

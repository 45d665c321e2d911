"""The offline MiniLM judge (embedded default; an approximation) with the real bundled model."""

from __future__ import annotations

import os

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

"""``--judge offline_judge_fn:score`` for dose_response.py: the embedded offline judge (an APPROXIMATION of the
paper's LLM judge), anchored on SmolLM2's own unsteered answers when the workflow has written those anchors (rule anchor_judge)."""

from functools import lru_cache
from pathlib import Path

ANCHORS = Path("results/judge/smollm2-135m/anchors.json")


@lru_cache(maxsize=1)
def _judge():
    from esr.judge import build_judge

    return build_judge(
        {"backend": "offline_minilm", "anchors": str(ANCHORS) if ANCHORS.exists() else None},
        show_progress=False,
    )


def score(prompt: str, response: str, label: str) -> float:
    """First-attempt score (0-100)."""
    result = _judge().grade(prompt, response, label)
    return result.scores[0] if result.scores else 0.0

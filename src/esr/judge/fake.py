"""A deterministic fake judge, for unit tests only (never for results).

Rules: attempts split at restart language (as the offline judge does); an attempt scores 0 when it mentions any word
of the latent label (case-insensitive, words of 3+ letters), else 100, unless ``score_fn`` says otherwise. Responses
containing ``fail_marker`` come back as parse errors. ``calls`` counts uncached gradings."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esr.judge.base import Attempt, Judge, JudgeRequest, JudgeResult
from esr.judge.segmentation import PATTERNS_ONLY, split_attempts

FAKE_TEMPLATE_VERSION = "fake-v1"


def label_mention_score(attempt: str, request: JudgeRequest) -> float:
    """0 if the attempt mentions a word of the latent label, else 100."""
    words = {w for w in re.findall(r"[a-z]{3,}", request.latent_label.lower())}
    text = attempt.lower()
    return 0.0 if any(re.search(rf"\b{re.escape(w)}", text) for w in words) else 100.0


@dataclass(frozen=True)
class FakeJudgeSettings:
    """What the fake judge's results depend on (its cache key)."""

    model: str
    template_version: str
    score_fn: str
    fail_marker: str | None
    restart_gate: bool
    restart: dict[str, Any]


class FakeJudge(Judge):
    """Test double with the same interface and caching as the real judges."""

    backend = "fake"
    template_version = FAKE_TEMPLATE_VERSION

    def __init__(
        self,
        model: str = "fake-judge",
        *,
        score_fn: Callable[[str, JudgeRequest], float] | None = None,
        fail_marker: str | None = "<<FAIL>>",
        restart_gate: bool = False,
        cache=None,
        concurrency: int = 4,
        show_progress: bool = False,
        max_consecutive_failures: int | None = 20,
    ) -> None:
        super().__init__(
            cache=cache,
            concurrency=concurrency,
            show_progress=show_progress,
            max_consecutive_failures=max_consecutive_failures,
        )
        self.model = model
        self.score_fn = score_fn or label_mention_score
        self.fail_marker = fail_marker
        self.restart_gate = restart_gate
        self.calls = 0
        self.settings = FakeJudgeSettings(
            model=model,
            template_version=self.template_version,
            score_fn=f"{getattr(self.score_fn, '__module__', '')}.{getattr(self.score_fn, '__qualname__', '')}",
            fail_marker=fail_marker,
            restart_gate=restart_gate,
            restart=PATTERNS_ONLY.version(),
        )

    async def _agrade_uncached(self, request: JudgeRequest, ctx: Any) -> JudgeResult:
        self.calls += 1
        self.stats.backend_calls += 1
        if self.fail_marker and self.fail_marker in request.response:
            return self._error_result("fake parse failure", "parse", raw_text="not json", n_calls=1)
        attempts = [
            Attempt(text=p, score=float(self.score_fn(p, request)))
            for p in split_attempts(request.response, detector=PATTERNS_ONLY)
        ]
        raw = {"attempts": [{"attempt_text": a.text, "score": a.score} for a in attempts]}
        return JudgeResult(
            attempts=attempts,
            raw_text=f"<json>{json.dumps(raw)}</json>",
            judge_id=self.judge_id,
            template_version=self.template_version,
            n_calls=1,
            metadata={"fake": True},
        )

"""The judge stage: split answers into attempts and score each 0-100; grade latent labels for concreteness.

Backends (``build_judge(config)``): ``anthropic`` (Messages API; the paper's grader ``claude-haiku-4-5-20251001``),
``openai_compat`` (any Chat Completions server; both on the official vendor SDKs), ``offline_minilm`` (the embedded
default, an APPROXIMATION: restart segmentation + MiniLM relevance) and ``fake`` (unit tests only). All share ``Judge.grade`` /
``grade_batch`` / ``agrade_batch``, the content-addressed cache and the counters in ``judge.stats``."""

from typing import Any

from esr.judge.base import (
    TRANSPORT_KINDS,
    Attempt,
    Judge,
    JudgeAuthError,
    JudgeCircuitOpen,
    JudgeFatalError,
    JudgeRequest,
    JudgeResult,
    JudgeStats,
)
from esr.judge.cache import JudgeCache
from esr.judge.offline import DEFAULT_ANCHORS, OFFLINE_JUDGE_ID, Anchors, OfflineMiniLMJudge, fit_anchors
from esr.judge.parsing import MalformedJudgeOutput, parse_attempts
from esr.judge.prompts import CONCRETENESS_TEMPLATE_VERSION, JUDGE_TEMPLATE_VERSION
from esr.judge.segmentation import RestartDetector, find_restarts, restart_gate, split_attempts
from esr.judge.settings import key_fields, not_in_key

# The HTTP judges and what builds them import the vendor SDKs (anthropic + openai: ~1.5 s). They load on first use
# (PEP 562), so that `import esr.judge.base` (the trials table: every Snakefile parse, every SLURM job) stays fast.
_HTTP_BACKENDS = frozenset(
    {"PAPER_JUDGE_MODEL", "AnthropicBackend", "ChatSettings", "LLMJudge", "OpenAICompatBackend", "anthropic_judge",
     "openai_compat_judge"}
)  # fmt: skip
_CONCRETENESS = frozenset(
    {"PAPER_CONCRETENESS_MODEL", "PAPER_THRESHOLD", "ConcretenessScore", "LLMConcretenessGrader", "WordNetConcreteness"}
)
_FACTORY = frozenset({"build_concreteness_grader", "build_judge"})


def __getattr__(name: str) -> Any:
    if name in _HTTP_BACKENDS:
        from esr.judge import http_backends as module
    elif name in _CONCRETENESS:
        from esr.judge import concreteness as module
    elif name in _FACTORY:
        from esr.judge import factory as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = [
    "Anchors",
    "Attempt",
    "DEFAULT_ANCHORS",
    "OFFLINE_JUDGE_ID",
    "OfflineMiniLMJudge",
    "fit_anchors",
    "AnthropicBackend",
    "CONCRETENESS_TEMPLATE_VERSION",
    "ChatSettings",
    "ConcretenessScore",
    "JUDGE_TEMPLATE_VERSION",
    "Judge",
    "JudgeAuthError",
    "JudgeCircuitOpen",
    "JudgeFatalError",
    "JudgeCache",
    "JudgeRequest",
    "JudgeResult",
    "JudgeStats",
    "LLMConcretenessGrader",
    "LLMJudge",
    "RestartDetector",
    "MalformedJudgeOutput",
    "OpenAICompatBackend",
    "PAPER_CONCRETENESS_MODEL",
    "PAPER_JUDGE_MODEL",
    "PAPER_THRESHOLD",
    "TRANSPORT_KINDS",
    "WordNetConcreteness",
    "anthropic_judge",
    "build_concreteness_grader",
    "build_judge",
    "find_restarts",
    "key_fields",
    "not_in_key",
    "openai_compat_judge",
    "parse_attempts",
    "restart_gate",
    "split_attempts",
]

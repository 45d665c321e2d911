"""The judge stage: split answers into attempts and score each 0-100; grade latent labels for concreteness.

Backends (``build_judge(config)``): ``anthropic`` (Messages API; the paper's grader ``claude-haiku-4-5-20251001``),
``openai_compat`` (any Chat Completions server; both on the official vendor SDKs), ``offline_minilm`` (the embedded
default, an APPROXIMATION: restart segmentation + MiniLM relevance) and ``fake`` (unit tests only). All share ``Judge.grade`` /
``grade_batch`` / ``agrade_batch``, the content-addressed cache and the counters in ``judge.stats``."""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562), so that `import esr.judge.base` (the trials table, every Snakefile parse)
# does not import the vendor SDKs (anthropic + openai: ~1.5 s at every process start of every SLURM job).
_EXPORTS: dict[str, str] = {
    "TRANSPORT_KINDS": "esr.judge.base",
    "Attempt": "esr.judge.base",
    "Judge": "esr.judge.base",
    "JudgeAuthError": "esr.judge.base",
    "JudgeCircuitOpen": "esr.judge.base",
    "JudgeFatalError": "esr.judge.base",
    "JudgeRequest": "esr.judge.base",
    "JudgeResult": "esr.judge.base",
    "JudgeStats": "esr.judge.base",
    "JudgeCache": "esr.judge.cache",
    "PAPER_CONCRETENESS_MODEL": "esr.judge.concreteness",
    "PAPER_THRESHOLD": "esr.judge.concreteness",
    "ConcretenessScore": "esr.judge.concreteness",
    "LLMConcretenessGrader": "esr.judge.concreteness",
    "WordNetConcreteness": "esr.judge.concreteness",
    "build_concreteness_grader": "esr.judge.factory",
    "build_judge": "esr.judge.factory",
    "PAPER_JUDGE_MODEL": "esr.judge.http_backends",
    "AnthropicBackend": "esr.judge.http_backends",
    "ChatSettings": "esr.judge.http_backends",
    "LLMJudge": "esr.judge.http_backends",
    "OpenAICompatBackend": "esr.judge.http_backends",
    "anthropic_judge": "esr.judge.http_backends",
    "openai_compat_judge": "esr.judge.http_backends",
    "DEFAULT_ANCHORS": "esr.judge.offline",
    "OFFLINE_JUDGE_ID": "esr.judge.offline",
    "Anchors": "esr.judge.offline",
    "OfflineMiniLMJudge": "esr.judge.offline",
    "fit_anchors": "esr.judge.offline",
    "MalformedJudgeOutput": "esr.judge.parsing",
    "parse_attempts": "esr.judge.parsing",
    "CONCRETENESS_TEMPLATE_VERSION": "esr.judge.prompts",
    "JUDGE_TEMPLATE_VERSION": "esr.judge.prompts",
    "RestartDetector": "esr.judge.segmentation",
    "find_restarts": "esr.judge.segmentation",
    "restart_gate": "esr.judge.segmentation",
    "split_attempts": "esr.judge.segmentation",
    "key_fields": "esr.judge.settings",
    "not_in_key": "esr.judge.settings",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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

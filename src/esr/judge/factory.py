"""Build judges and concreteness graders from config blocks, and the JSON-schema fragments for those blocks.

The lead merges ``JUDGE_CONFIG_SCHEMA`` (as ``properties.judge``) and ``CONCRETENESS_CONFIG_SCHEMA`` (as
``properties.concreteness``) into ``workflow/schemas/config.schema.yaml``. Secrets never appear in a config: only the
*name* of the environment variable holding the key (``api_key_env``)."""

from __future__ import annotations

import copy
from typing import Any

from esr.judge.base import Judge
from esr.judge.cache import JudgeCache
from esr.judge.concreteness import (PAPER_CONCRETENESS_MODEL, PAPER_THRESHOLD, LLMConcretenessGrader,
                                    WordNetConcreteness)
from esr.judge.http_backends import (PAPER_JUDGE_MODEL, AnthropicBackend, ChatBackend, ChatSettings, LLMJudge,
                                     OpenAICompatBackend)

_CHAT_PROPERTIES: dict[str, Any] = {
    "model": {"type": ["string", "null"], "default": None,
              "description": "model id; null = the paper's model for anthropic; required for openai_compat"},
    "base_url": {"type": ["string", "null"], "default": None,
                 "description": "API root; null = https://api.anthropic.com (anthropic) or https://api.openai.com/v1 "
                                "(openai_compat; give e.g. http://127.0.0.1:8000/v1 for vLLM)"},
    "api_key_env": {"type": ["string", "null"], "default": None,
                    "description": "NAME of the environment variable holding the API key (never the key); null = "
                                   "ANTHROPIC_API_KEY / OPENAI_API_KEY"},
    "temperature": {"type": ["number", "null"], "minimum": 0, "default": 0.0,
                    "description": "sampling temperature; null = do not send one (provider default, as the paper)"},
    "max_tokens": {"type": "integer", "minimum": 16, "default": 2048},
    "concurrency": {"type": "integer", "minimum": 1, "default": 4},
    "rate_limit_per_s": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": 3,
                         "description": "max call starts per second per judge process (null = unlimited)"},
    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "default": 120},
    "max_retries": {"type": "integer", "minimum": 0, "default": 4,
                    "description": "transport retries per call (429/5xx/timeouts; Retry-After honoured)"},
    "max_parse_retries": {"type": "integer", "minimum": 0, "default": 2,
                          "description": "extra calls after a malformed verdict before it is recorded as an error"},
    "backoff_base_s": {"type": "number", "minimum": 0, "default": 1.0},
    "cache_dir": {"type": ["string", "null"], "default": "results/judge_cache",
                  "description": "content-addressed cache directory; null = no cache"},
}

JUDGE_CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The answer judge. offline_minilm is the embedded default and an APPROXIMATION of the paper's "
                   "LLM judge (claude-haiku-4-5-20251001 via backend anthropic).",
    "additionalProperties": False,
    "properties": {
        "backend": {"enum": ["offline_minilm", "anthropic", "openai_compat", "fake"], "default": "offline_minilm"},
        **copy.deepcopy(_CHAT_PROPERTIES),
        "restart_gate": {"type": "boolean", "default": False,
                         "description": "accept an LLM judge's attempt boundary only where restart language occurs "
                                        "in the response (off = paper fidelity)"},
        "calibration": {"type": ["string", "null"], "default": None,
                        "description": "offline_minilm: calibration JSON path; null = built-in default "
                                       "(cos 0.086 -> 0, 0.718 -> 100)"},
        "device": {"type": "string", "default": "cpu", "description": "offline_minilm: torch device"},
    },
}

CONCRETENESS_CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Concreteness grader for latent labels (paper: claude-sonnet-4-5-20250929, keep >= 65). wordnet "
                   "is an offline APPROXIMATION.",
    "additionalProperties": False,
    "properties": {
        "backend": {"enum": ["wordnet", "anthropic", "openai_compat"], "default": "wordnet"},
        **copy.deepcopy(_CHAT_PROPERTIES),
        "threshold": {"type": "number", "minimum": 0, "maximum": 100, "default": PAPER_THRESHOLD},
        "batch_size": {"type": "integer", "minimum": 1, "default": 50},
        "fail_mode": {"enum": ["closed", "error"], "default": "closed",
                      "description": "closed = a failed batch scores 0 (paper); error = score null. Always counted."},
        "wordnet_dir": {"type": "string", "default": "/usr/share/wordnet"},
    },
}
CONCRETENESS_CONFIG_SCHEMA["properties"]["concurrency"]["default"] = 2
CONCRETENESS_CONFIG_SCHEMA["properties"]["max_tokens"]["default"] = 8192  # 50 labels with reasons (paper: 10000)


def _defaults(schema: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    unknown = set(config) - set(schema["properties"])
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(schema['properties'])}")
    out = {k: copy.deepcopy(v.get("default")) for k, v in schema["properties"].items()}
    out.update(config)
    return out


def _chat_backend(cfg: dict[str, Any], default_model: str | None) -> ChatBackend:
    backend = cfg["backend"]
    model = cfg.get("model") or default_model
    if not model:
        raise ValueError(f"backend {backend!r} needs a 'model'")
    anthropic = backend == "anthropic"
    settings = ChatSettings(
        model=model,
        base_url=cfg.get("base_url") or ("https://api.anthropic.com" if anthropic else "https://api.openai.com/v1"),
        api_key_env=cfg.get("api_key_env") or ("ANTHROPIC_API_KEY" if anthropic else "OPENAI_API_KEY"),
        temperature=cfg["temperature"], max_tokens=cfg["max_tokens"], timeout_s=cfg["timeout_s"],
        max_retries=cfg["max_retries"], rate_limit_per_s=cfg["rate_limit_per_s"],
        backoff_base_s=cfg["backoff_base_s"])
    return AnthropicBackend(settings) if anthropic else OpenAICompatBackend(settings)


def build_judge(config: dict[str, Any], *, show_progress: bool = True, encoder=None) -> Judge:
    """A judge from a ``judge:`` config block (keys and defaults: ``JUDGE_CONFIG_SCHEMA``). ``encoder``: a preloaded
    sentence-transformers model for offline_minilm (tests, or sharing one model across judges)."""
    cfg = _defaults(JUDGE_CONFIG_SCHEMA, config)
    cache = JudgeCache(cfg["cache_dir"]) if cfg["cache_dir"] else None
    backend = cfg["backend"]
    if backend == "offline_minilm":
        from esr.judge.offline import Calibration, OfflineMiniLMJudge

        calibration = Calibration.load(cfg["calibration"]) if cfg["calibration"] else None
        return OfflineMiniLMJudge(calibration, encoder=encoder, device=cfg["device"], cache=cache,
                                  show_progress=show_progress)
    if backend == "fake":
        from esr.judge.fake import FakeJudge

        return FakeJudge(cfg.get("model") or "fake-judge", restart_gate=cfg["restart_gate"], cache=cache,
                         concurrency=cfg["concurrency"], show_progress=show_progress)
    if backend in ("anthropic", "openai_compat"):
        chat = _chat_backend(cfg, PAPER_JUDGE_MODEL if backend == "anthropic" else None)
        return LLMJudge(chat, restart_gate=cfg["restart_gate"], max_parse_retries=cfg["max_parse_retries"],
                        cache=cache, concurrency=cfg["concurrency"], show_progress=show_progress)
    raise ValueError(f"unknown judge backend {backend!r}")


def build_concreteness_grader(config: dict[str, Any], *, show_progress: bool = True):
    """A concreteness grader from a ``concreteness:`` config block (``CONCRETENESS_CONFIG_SCHEMA``)."""
    cfg = _defaults(CONCRETENESS_CONFIG_SCHEMA, config)
    if cfg["backend"] == "wordnet":
        return WordNetConcreteness(cfg["wordnet_dir"], threshold=cfg["threshold"])
    if cfg["backend"] in ("anthropic", "openai_compat"):
        chat = _chat_backend(cfg, PAPER_CONCRETENESS_MODEL if cfg["backend"] == "anthropic" else None)
        cache = JudgeCache(cfg["cache_dir"]) if cfg["cache_dir"] else None
        return LLMConcretenessGrader(chat, batch_size=cfg["batch_size"], threshold=cfg["threshold"],
                                     fail_mode=cfg["fail_mode"], max_parse_retries=cfg["max_parse_retries"],
                                     concurrency=cfg["concurrency"], cache=cache, show_progress=show_progress)
    raise ValueError(f"unknown concreteness backend {cfg['backend']!r}")

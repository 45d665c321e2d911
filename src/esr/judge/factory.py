"""Build judges and concreteness graders from config blocks (keys and defaults: ``$defs/judge`` and
``$defs/concreteness`` of ``workflow/schemas/config.schema.yaml``). Secrets never appear in a config: only the *name*
of the environment variable holding the key (``api_key_env``)."""

from __future__ import annotations

import copy
from typing import Any

from esr.judge.base import Judge
from esr.judge.cache import JudgeCache
from esr.judge.concreteness import PAPER_CONCRETENESS_MODEL, LLMConcretenessGrader, WordNetConcreteness
from esr.judge.http_backends import (
    PAPER_JUDGE_MODEL,
    AnthropicBackend,
    ChatBackend,
    ChatSettings,
    LLMJudge,
    OpenAICompatBackend,
)

#: Judge backends that call a remote API over HTTP (the others compute locally: offline_minilm, fake, wordnet).
API_BACKENDS = ("anthropic", "openai_compat")


def _block_schema(name: str) -> dict[str, Any]:
    """The ``$defs`` entry of a judge-like block in the config schema (the one source of its keys and defaults)."""
    from esr.config import load_schema

    return load_schema()["$defs"][name]


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
        temperature=cfg["temperature"],
        max_tokens=cfg["max_tokens"],
        timeout_s=cfg["timeout_s"],
        max_retries=cfg["max_retries"],
        rate_limit_per_s=cfg["rate_limit_per_s"],
        backoff_base_s=cfg["backoff_base_s"],
        max_retry_wait_s=cfg["max_retry_wait_s"],
    )
    return AnthropicBackend(settings) if anthropic else OpenAICompatBackend(settings)


def anchors_file(model: str) -> str:
    """The offline judge's anchors fitted on ``model``'s own answers (rule ``anchor_judge``), relative to the
    workflow's directory."""
    return f"results/judge/{model}/anchors.json"


def auto_anchors(block: dict[str, Any]) -> bool:
    """Whether a judge block is the offline judge anchored on the model's own answers (``anchors: auto``)."""
    return block.get("backend") == "offline_minilm" and block.get("anchors") == "auto"


def resolved_judge(block: dict[str, Any], model: str) -> dict[str, Any]:
    """A copy of ``block`` with ``anchors: auto`` replaced by ``model``'s anchor file (:func:`anchors_file`); the
    workflow's rules and the exp4 recipe tool build their judges from this."""
    return {**block, "anchors": anchors_file(model)} if auto_anchors(block) else dict(block)


def build_judge(config: dict[str, Any], *, show_progress: bool = True, encoder=None) -> Judge:
    """A judge from a ``judge:`` config block (keys and defaults: ``JUDGE_CONFIG_SCHEMA``). ``encoder``: a preloaded
    sentence-transformers model for offline_minilm (tests, or sharing one model across judges)."""
    cfg = _defaults(_block_schema("judge"), config)
    cache = JudgeCache(cfg["cache_dir"]) if cfg["cache_dir"] else None
    backend = cfg["backend"]
    if backend == "offline_minilm":
        from esr.judge.offline import Anchors, OfflineMiniLMJudge

        anchors = Anchors.load(cfg["anchors"]) if cfg["anchors"] else None
        return OfflineMiniLMJudge(
            anchors,
            encoder=encoder,
            device=cfg["device"],
            restart_semantic=cfg["restart_semantic"],
            restart_margin=cfg["restart_margin"],
            cache=cache,
            show_progress=show_progress,
        )
    if backend == "fake":
        from esr.judge.fake import FakeJudge

        return FakeJudge(
            cfg.get("model") or "fake-judge",
            restart_gate=cfg["restart_gate"],
            cache=cache,
            concurrency=cfg["concurrency"],
            show_progress=show_progress,
            max_consecutive_failures=cfg["max_consecutive_failures"],
        )
    if backend in API_BACKENDS:
        chat = _chat_backend(cfg, PAPER_JUDGE_MODEL if backend == "anthropic" else None)
        return LLMJudge(
            chat,
            restart_gate=cfg["restart_gate"],
            max_parse_retries=cfg["max_parse_retries"],
            json_block=cfg["json_block"],
            reask_temperature=cfg["reask_temperature"],
            cache=cache,
            concurrency=cfg["concurrency"],
            show_progress=show_progress,
            max_consecutive_failures=cfg["max_consecutive_failures"],
        )
    raise ValueError(f"unknown judge backend {backend!r}")


def build_concreteness_grader(config: dict[str, Any], *, show_progress: bool = True):
    """A concreteness grader from a ``concreteness:`` config block (``CONCRETENESS_CONFIG_SCHEMA``)."""
    cfg = _defaults(_block_schema("concreteness"), config)
    if cfg["backend"] == "wordnet":
        return WordNetConcreteness(cfg["wordnet_dir"], threshold=cfg["threshold"])
    if cfg["backend"] in API_BACKENDS:
        chat = _chat_backend(cfg, PAPER_CONCRETENESS_MODEL if cfg["backend"] == "anthropic" else None)
        cache = JudgeCache(cfg["cache_dir"]) if cfg["cache_dir"] else None
        return LLMConcretenessGrader(
            chat,
            batch_size=cfg["batch_size"],
            threshold=cfg["threshold"],
            fail_mode=cfg["fail_mode"],
            max_parse_retries=cfg["max_parse_retries"],
            reask_temperature=cfg["reask_temperature"],
            concurrency=cfg["concurrency"],
            cache=cache,
            show_progress=show_progress,
        )
    raise ValueError(f"unknown concreteness backend {cfg['backend']!r}")

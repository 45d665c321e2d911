"""LLM judges over HTTP (httpx, no vendor SDKs): the Anthropic Messages API and any OpenAI-compatible Chat
Completions server (OpenAI, vLLM, llama.cpp ``llama-server``, ollama, hosted gateways).

Transport rules: at most ``rate_limit_per_s`` call starts per second per judge; 408/409/425/429/5xx, timeouts,
connection errors and unreadable bodies are retried with exponential backoff and jitter, honouring ``Retry-After``
(seconds or HTTP date); other 4xx fail at once. A reply that is not a valid verdict is asked again (up to
``max_parse_retries`` more calls, with backoff) and finally recorded as a ``parse`` error with the raw text kept.
API keys are read from the environment when a batch starts and are scrubbed from every error message and raw text."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from esr.judge.base import Judge, JudgeRequest, JudgeResult
from esr.judge.parsing import MalformedJudgeOutput, parse_attempts
from esr.judge.prompts import JUDGE_TEMPLATE_VERSION, judge_messages
from esr.judge.segmentation import restart_gate

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
PAPER_JUDGE_MODEL = "claude-haiku-4-5-20251001"
RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class CallCounters(Protocol):
    """What :meth:`ChatBackend.complete` counts into: ``JudgeStats`` and ``ConcretenessStats`` both qualify."""

    backend_calls: int
    http_retries: int


@dataclass
class CallTally:
    """HTTP calls spent on one request."""

    calls: int = 0


class TransportError(RuntimeError):
    """The API could not be reached or kept failing; ``retryable`` says whether more tries might help."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class MissingAPIKey(RuntimeError):
    """The configured API-key environment variable is not set."""


class RateLimiter:
    """Spaces call starts at least ``1/rate`` seconds apart. One per judge (no global state); it keeps its schedule
    across batches and event loops, so repeated ``grade()`` calls are limited too."""

    def __init__(self, rate_per_s: float | None) -> None:
        self.interval = 1.0 / rate_per_s if rate_per_s and rate_per_s > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if self.interval <= 0:
            return
        # no await between reading and updating the schedule, so one event loop needs no lock
        now = time.monotonic()
        delay = self._next - now
        self._next = max(now, self._next) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def scrub(text: str | None, secret: str | None) -> str | None:
    """``text`` with every occurrence of ``secret`` replaced (defence in depth: keys must never reach disk).
    Secrets shorter than 8 characters (dummy keys for local servers) are left alone: replacing them would mangle
    ordinary text."""
    if text is None or not secret or len(secret) < 8:
        return text
    return text.replace(secret, "<redacted>")


@dataclass
class ChatSettings:
    """Everything a chat backend needs. ``api_key_env`` names the environment variable holding the key (the key
    itself never enters a config or an object that gets serialised)."""

    model: str
    base_url: str
    api_key_env: str | None
    temperature: float | None = 0.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 4
    rate_limit_per_s: float | None = 3.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    extra_headers: dict[str, str] = field(default_factory=dict)


class ChatBackend:
    """One chat-completion API. Subclasses define the wire format (``request`` / ``reply_text``)."""

    name = "chat"
    key_required = True

    def __init__(self, settings: ChatSettings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------------------------------------ wire format
    def request(self, system: str, user: str, api_key: str | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def reply_text(self, body: Any) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ transport
    def api_key(self) -> str | None:
        env = self.settings.api_key_env
        key = os.environ.get(env) if env else None
        if not key and self.key_required:
            raise MissingAPIKey(f"environment variable {env!r} (API key for {self.name}) is not set")
        return key or None

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0-based)."""
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.retry_after_max_s)
        return min(s.backoff_max_s, s.backoff_base_s * (2**attempt)) * (0.5 + random.random() / 2)

    async def _post_once(self, client: httpx.AsyncClient, system: str, user: str, key: str | None) -> str:
        url, headers, payload = self.request(system, user, key)
        try:
            resp = await client.post(url, headers=headers, json=payload, timeout=self.settings.timeout_s)
        except httpx.TimeoutException as exc:
            raise TransportError(f"timeout after {self.settings.timeout_s}s ({type(exc).__name__})", True) from None
        except httpx.HTTPError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}", True) from None
        if resp.status_code != 200:
            retryable = resp.status_code in RETRYABLE_STATUS
            detail = resp.text[:300].replace("\n", " ")
            raise TransportError(
                f"HTTP {resp.status_code}: {detail}", retryable, parse_retry_after(resp.headers.get("retry-after"))
            )
        try:
            return self.reply_text(resp.json())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise TransportError(f"unreadable response body ({type(exc).__name__}: {exc})", True) from None

    async def complete(
        self,
        client: httpx.AsyncClient,
        limiter: RateLimiter,
        system: str,
        user: str,
        key: str | None,
        stats: CallCounters,
        tally: CallTally | None = None,
    ) -> str:
        """The model's reply text, after up to ``max_retries`` transport retries; raises ``TransportError``.
        Every HTTP call is counted in ``stats`` and in ``tally`` (the per-request count)."""
        attempt = 0
        while True:
            await limiter.wait()
            stats.backend_calls += 1
            if tally is not None:
                tally.calls += 1
            try:
                return await self._post_once(client, system, user, key)
            except TransportError as exc:
                if not exc.retryable or attempt >= self.settings.max_retries:
                    raise TransportError(scrub(f"{exc} (after {attempt + 1} tries)", key), False) from None
                stats.http_retries += 1
                delay = self.backoff(attempt, exc.retry_after)
                log.info(
                    "%s %s: retry %d in %.2fs after %s",
                    self.name,
                    self.settings.model,
                    attempt + 1,
                    delay,
                    scrub(str(exc), key),
                )
                await asyncio.sleep(delay)
                attempt += 1


class AnthropicBackend(ChatBackend):
    """Anthropic Messages API: ``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``."""

    name = "anthropic"

    def request(self, system, user, api_key):
        s = self.settings
        headers = {
            "x-api-key": api_key or "",
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            **s.extra_headers,
        }
        payload: dict[str, Any] = {
            "model": s.model,
            "max_tokens": s.max_tokens,
            "system": system,
            "messages": [{"role": "user", "content": user}],
        }
        if s.temperature is not None:
            payload["temperature"] = s.temperature
        return f"{s.base_url.rstrip('/')}/v1/messages", headers, payload

    def reply_text(self, body):
        blocks = body["content"]
        return "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")


class OpenAICompatBackend(ChatBackend):
    """OpenAI-style Chat Completions: ``POST {base_url}/chat/completions`` (``base_url`` ends in ``/v1``) with a
    Bearer key when one is configured; local servers (vLLM, llama.cpp, ollama) usually need none."""

    name = "openai_compat"
    key_required = False

    def request(self, system, user, api_key):
        s = self.settings
        headers = {"content-type": "application/json", **s.extra_headers}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        payload: dict[str, Any] = {
            "model": s.model,
            "max_tokens": s.max_tokens,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
        if s.temperature is not None:
            payload["temperature"] = s.temperature
        return f"{s.base_url.rstrip('/')}/chat/completions", headers, payload

    def reply_text(self, body):
        content = body["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else ""


@dataclass
class _BatchContext:
    client: httpx.AsyncClient
    limiter: RateLimiter
    key: str | None


class LLMJudge(Judge):
    """An LLM judge on a chat backend: our prompt, strict parsing with re-asks, and the optional restart gate.

    ``restart_gate`` (off by default, for paper fidelity): keep a judge's attempt boundary only where restart
    language occurs in the response. ``max_parse_retries``: extra calls after a malformed verdict."""

    template_version = JUDGE_TEMPLATE_VERSION

    def __init__(
        self,
        chat: ChatBackend,
        *,
        restart_gate: bool = False,
        max_parse_retries: int = 2,
        cache=None,
        concurrency: int = 4,
        show_progress: bool = True,
    ) -> None:
        super().__init__(cache=cache, concurrency=concurrency, show_progress=show_progress)
        self.chat = chat
        self.limiter = RateLimiter(chat.settings.rate_limit_per_s)
        self.backend = chat.name
        self.model = chat.settings.model
        self.restart_gate = restart_gate
        self.max_parse_retries = max(0, int(max_parse_retries))

    def sampling_params(self) -> dict[str, Any]:
        s = self.chat.settings
        # base_url is not part of the key: the same model behind another URL gives the same kind of answer
        return {"temperature": s.temperature, "max_tokens": s.max_tokens, "restart_gate": self.restart_gate}

    async def _open(self) -> _BatchContext:
        key = self.chat.api_key()
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        return _BatchContext(httpx.AsyncClient(limits=limits), self.limiter, key)

    async def _close(self, ctx: _BatchContext) -> None:
        await ctx.client.aclose()

    async def _agrade_uncached(self, request: JudgeRequest, ctx: _BatchContext) -> JudgeResult:
        system, user = judge_messages(request.prompt, request.response, request.latent_label)
        tally = CallTally()
        failures: list[str] = []
        raw: str | None = None
        for parse_try in range(self.max_parse_retries + 1):
            try:
                reply = await self.chat.complete(ctx.client, ctx.limiter, system, user, ctx.key, self.stats, tally)
                raw = scrub(reply, ctx.key)
            except TransportError as exc:
                res = self._error_result(str(exc), "http", raw, tally.calls)
                res.metadata["parse_failures"] = failures
                return res
            try:
                attempts = parse_attempts(raw)
            except MalformedJudgeOutput as exc:
                failures.append(str(exc))
                if parse_try < self.max_parse_retries:
                    self.stats.parse_retries += 1
                    await asyncio.sleep(self.chat.backoff(parse_try))
                continue
            metadata: dict[str, Any] = {"parse_failures": failures}
            if self.restart_gate:
                attempts, merges = restart_gate(request.response, attempts)
                metadata["restart_gate_merges"] = merges
                self.stats.gate_merges += merges
            return JudgeResult(
                attempts=attempts,
                raw_text=raw,
                judge_id=self.judge_id,
                template_version=self.template_version,
                n_calls=tally.calls,
                metadata=metadata,
            )
        res = self._error_result(
            f"malformed judge output after {self.max_parse_retries + 1} replies: {failures[-1]}",
            "parse",
            raw,
            tally.calls,
        )
        res.metadata["parse_failures"] = failures
        return res


def anthropic_judge(
    model: str = PAPER_JUDGE_MODEL,
    *,
    base_url: str = "https://api.anthropic.com",
    api_key_env: str = "ANTHROPIC_API_KEY",
    **kwargs: Any,
) -> LLMJudge:
    """An ``LLMJudge`` on the Anthropic Messages API (paper grader by default). ``kwargs``: ``ChatSettings``
    fields and ``LLMJudge`` options."""
    settings, judge_kwargs = _split_kwargs(kwargs)
    return LLMJudge(
        AnthropicBackend(ChatSettings(model=model, base_url=base_url, api_key_env=api_key_env, **settings)),
        **judge_kwargs,
    )


def openai_compat_judge(
    model: str,
    *,
    base_url: str = "https://api.openai.com/v1",
    api_key_env: str | None = "OPENAI_API_KEY",
    **kwargs: Any,
) -> LLMJudge:
    """An ``LLMJudge`` on an OpenAI-compatible server at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""
    settings, judge_kwargs = _split_kwargs(kwargs)
    return LLMJudge(
        OpenAICompatBackend(ChatSettings(model=model, base_url=base_url, api_key_env=api_key_env, **settings)),
        **judge_kwargs,
    )


_JUDGE_KWARGS = ("restart_gate", "max_parse_retries", "cache", "concurrency", "show_progress")


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    judge = {k: kwargs.pop(k) for k in list(kwargs) if k in _JUDGE_KWARGS}
    return kwargs, judge

"""LLM judges over the official vendor SDKs: ``anthropic`` (Messages API) and ``openai`` (Chat Completions; any
OpenAI-compatible server: OpenAI, OpenRouter, vLLM, llama.cpp ``llama-server``, ollama).

Transport is the SDKs' own (``AsyncAnthropic`` / ``AsyncOpenAI``), configured from our settings: their retry policy
(408/409/429/5xx, timeouts and connection errors; ``max_retries`` retries), their exponential backoff with jitter
(0.5 s doubling to 8 s), their per-try ``timeout_s``, and their reading of the server's wait hints
(``retry-after-ms``, then ``Retry-After`` seconds or HTTP date), see
https://github.com/anthropics/anthropic-sdk-python#retries and https://github.com/openai/openai-python#retries. The
SDKs differ on long hints (anthropic waits any hint; openai refuses to retry past 2 min), so a response hook cuts
every hint to ``max_retry_wait_s``: one call takes at most ``(max_retries + 1) * timeout_s + max_retries *
max(8 s, max_retry_wait_s)``. On top of the SDKs this module adds only what they do not do: at most
``rate_limit_per_s`` HTTP attempts per second (an ``httpx2`` request hook, so SDK retries are spaced too), shared by
every process whose judge has the same cache directory (``esr.judge.ratelimit``: all grade jobs of a run together),
per-request call counting, a retry when a 200 reply has an unreadable body, failure kinds (``http`` with the
status, ``timeout``, ``connection``, ``unreadable``), ``JudgeAuthError`` on 401/403 (stops the run: no key is
retried), the judge prompt, robust verdict parsing and corrective re-asks. A reply that is not a
valid verdict is asked again with a corrective follow-up turn (the bad reply and what was wrong with it) at
``max(temperature, reask_temperature)``, because a temperature-0 judge asked the same thing repeats the same reply;
after ``max_parse_retries`` re-asks it is recorded as a ``parse`` error (``truncated`` when the last reply stopped at
``max_tokens``) with the raw text kept, never a crash.
API keys are read from the environment (``api_key_env``) when a batch starts, never logged, and scrubbed from every
error message and raw text."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import httpx2

from esr.judge.base import DEFAULT_MAX_CONSECUTIVE_FAILURES, Judge, JudgeAuthError, JudgeRequest, JudgeResult
from esr.judge.parsing import BLOCK_CHOICES, MalformedJudgeOutput, parse_attempts
from esr.judge.prompts import JUDGE_REASK_VERSION, JUDGE_TEMPLATE_VERSION, judge_messages, judge_reask
from esr.judge.ratelimit import RateLimiter, make_rate_limiter
from esr.judge.segmentation import RESTART_PATTERN_VERSION, restart_gate
from esr.judge.settings import not_in_key

log = logging.getLogger(__name__)

PAPER_JUDGE_MODEL = "claude-haiku-4-5-20251001"
_NO_KEY = "no-key-configured"  # placeholder for keyless local servers; its Authorization header is omitted


class CallCounters(Protocol):
    """What :meth:`ChatBackend.complete` counts into: ``JudgeStats`` and ``ConcretenessStats`` both qualify."""

    backend_calls: int
    http_retries: int


@dataclass
class CallTally:
    """HTTP calls spent on one request."""

    calls: int = 0


_ATTEMPTS: contextvars.ContextVar[CallTally | None] = contextvars.ContextVar("esr_judge_attempts", default=None)


class Reply(str):
    """A reply text that knows whether the model stopped at ``max_tokens`` (``truncated``)."""

    truncated: bool = False

    @classmethod
    def of(cls, text: str, truncated: bool) -> Reply:
        out = cls(text)
        out.truncated = truncated
        return out


class TransportError(RuntimeError):
    """The API could not be reached or kept failing (after the SDK's retries). ``kind``: ``http`` (an error
    status: ``status``), ``timeout``, ``connection`` or ``unreadable`` (a 200 reply without a readable body)."""

    def __init__(self, message: str, *, kind: str = "http", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class MissingAPIKey(RuntimeError):
    """The configured API-key environment variable is not set."""


def retry_hint_s(headers: httpx2.Headers) -> float | None:
    """The server's wait hint in seconds, read as the SDKs read it: ``retry-after-ms``, then ``Retry-After`` as
    seconds or as an HTTP date; None if absent or unreadable."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            pass
    when = headers.get("retry-after")
    parsed = email.utils.parsedate_tz(when) if when else None
    return None if parsed is None else email.utils.mktime_tz(parsed) - time.time()


def cap_retry_hint(headers: httpx2.Headers, max_wait_s: float) -> None:
    """Cut a server's wait hint longer than ``max_wait_s`` (or not finite) to ``max_wait_s``, in place: the SDK
    then retries after at most that long (RFC 9110 Sec. 10.2.3 ``Retry-After``; ``retry-after-ms`` is Anthropic's and
    OpenAI's millisecond variant, read first by both SDKs)."""
    hint = retry_hint_s(headers)
    if hint is None or hint <= max_wait_s:
        return
    headers["retry-after-ms"] = str(int(max_wait_s * 1000))
    if "retry-after" in headers:
        del headers["retry-after"]


def scrub(text: str | None, secret: str | None) -> str | None:
    """``text`` with every occurrence of ``secret`` replaced (defence in depth: keys must never reach disk).
    Secrets shorter than 8 characters (dummy keys for local servers) are left alone: replacing them would mangle
    ordinary text."""
    if text is None or not secret or len(secret) < 8:
        return text
    return text.replace(secret, "<redacted>")


_TRANSPORT = "transport only: changes whether a call succeeds, never the score of a stored verdict"


@dataclass(frozen=True)
class ChatSettings:
    """Everything a chat backend needs. ``api_key_env`` names the environment variable holding the key (the key
    itself never enters a config or an object that gets serialised). ``base_url`` is in the cache key: the same model
    id behind another server (another provider, another quantisation) can grade differently. ``timeout_s``,
    ``max_retries`` (SDK retries per call), ``rate_limit_per_s``, ``backoff_base_s`` (pause before re-reading an
    unreadable 200 body) and ``max_retry_wait_s`` (longest wait a server's ``Retry-After`` hint can impose) are
    transport-only and kept out of the key."""

    model: str
    base_url: str
    api_key_env: str | None = not_in_key("the name of a variable, not the key or the model", default=None)
    temperature: float | None = 0.0
    max_tokens: int = 2048
    timeout_s: float = not_in_key(_TRANSPORT, default=120.0)
    max_retries: int = not_in_key(_TRANSPORT, default=4)
    rate_limit_per_s: float | None = not_in_key(_TRANSPORT, default=3.0)
    backoff_base_s: float = not_in_key(_TRANSPORT, default=1.0)
    max_retry_wait_s: float = not_in_key(_TRANSPORT, default=60.0)
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ChatSession:
    """One batch's SDK client (sharing one connection pool) and the API key read for it."""

    client: Any
    http: httpx2.AsyncClient
    key: str | None

    async def aclose(self) -> None:
        await self.http.aclose()


_DEFAULT = object()


class ChatBackend:
    """One chat-completion API on its vendor SDK. Subclasses set ``client_class`` and define ``_create`` / ``reply_text``."""

    name = "chat"
    key_required = True
    # The vendor SDKs (and httpx2) are imported when a batch opens a session, not with this module: the trials
    # table, the Snakefile parse and every job that grades with a local judge never load them (~1.5 s).

    @property
    def sdk(self) -> Any:
        """The SDK module (its exception classes and async client class)."""
        raise NotImplementedError

    @property
    def client_class(self) -> Any:
        """The SDK's async client class (``anthropic.AsyncAnthropic``, ``openai.AsyncOpenAI``)."""
        raise NotImplementedError

    def __init__(self, settings: ChatSettings) -> None:
        self.settings = settings

    def api_key(self) -> str | None:
        """The key from the environment variable ``api_key_env``; raises ``MissingAPIKey`` if it is required and
        unset."""
        env = self.settings.api_key_env
        key = os.environ.get(env) if env else None
        if not key and self.key_required:
            raise MissingAPIKey(f"environment variable {env!r} (API key for {self.name}) is not set")
        return key or None

    def open_session(self, *, concurrency: int, limiter: RateLimiter) -> ChatSession:
        """An SDK client for one batch: at most ``concurrency`` connections; every HTTP attempt (SDK retries
        included) waits on ``limiter`` and is counted into the calling task's tally."""
        import httpx2

        async def on_request(request: httpx2.Request) -> None:
            await limiter.wait()
            tally = _ATTEMPTS.get()
            if tally is not None:
                tally.calls += 1

        async def on_response(response: httpx2.Response) -> None:
            cap_retry_hint(response.headers, self.settings.max_retry_wait_s)

        key = self.api_key()
        n = max(1, int(concurrency))
        http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=httpx2.Timeout(self.settings.timeout_s, connect=min(5.0, self.settings.timeout_s)),
            event_hooks={"request": [on_request], "response": [on_response]},
            follow_redirects=True,
        )
        return ChatSession(self._client(key, http), http, key)

    def _client(self, key: str | None, http: httpx2.AsyncClient) -> Any:
        """The SDK's async client (``client_class``) on our HTTP client, with our retry count and timeout."""
        s = self.settings
        return self.client_class(
            api_key=key or (None if self.key_required else _NO_KEY),
            base_url=s.base_url,
            max_retries=s.max_retries,
            timeout=s.timeout_s,
            http_client=http,
            default_headers=s.extra_headers or None,
        )

    async def _create(self, session: ChatSession, system: str, messages: list[dict], temperature, max_tokens) -> Any:
        raise NotImplementedError

    def reply_text(self, reply: Any) -> str:
        raise NotImplementedError

    def _auth_error(self, exc: Any, session: ChatSession) -> JudgeAuthError:
        """The run-stopping error for a 401/403: names the backend, server and key variable, never the key (the
        server's reply is shown only when a key long enough to be scrubbed from it was sent, or none at all)."""
        s = self.settings
        what = "authentication failed" if exc.status_code == 401 else "permission denied"
        body = exc.response.text[:200].replace("\n", " ") if exc.response is not None else ""
        key = session.key
        shown = body if key is None else (scrub(body, key) if len(key) >= 8 else "(reply not shown)")
        return JudgeAuthError(
            f"{self.name} judge {s.model!r} at {s.base_url}: HTTP {exc.status_code} {what}. Check the API key in "
            f"environment variable {s.api_key_env!r} (and its access to this model). Server said: {shown}"
        )

    async def complete(
        self,
        session: ChatSession,
        system: str,
        messages: list[dict[str, str]] | str,
        *,
        stats: CallCounters,
        tally: CallTally | None = None,
        temperature: float | None | object = _DEFAULT,
        max_tokens: int | None = None,
    ) -> str:
        """The model's reply text to ``system`` + ``messages`` (a user string or a list of ``{role, content}``
        turns). ``temperature``/``max_tokens`` default to the settings'. Raises ``TransportError`` after the SDK's
        retries (or after ``max_retries`` unreadable 200 bodies). Every HTTP attempt is counted in ``stats`` (calls,
        and retries = calls - 1) and in ``tally`` (the per-request count)."""
        s = self.settings
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        temperature = s.temperature if temperature is _DEFAULT else temperature
        max_tokens = max_tokens or s.max_tokens
        local = CallTally()
        token = _ATTEMPTS.set(local)
        try:
            for body_try in range(s.max_retries + 1):
                try:
                    reply = await self._create(session, system, messages, temperature, max_tokens)
                except (self.sdk.AuthenticationError, self.sdk.PermissionDeniedError) as exc:
                    raise self._auth_error(exc, session) from None
                except self.sdk.APIStatusError as exc:
                    detail = (exc.response.text if exc.response is not None else str(exc))[:300].replace("\n", " ")
                    message = f"HTTP {exc.status_code}: {detail} (after {local.calls} tries)"
                    raise TransportError(scrub(message, session.key), kind="http", status=exc.status_code) from None
                except self.sdk.APIConnectionError as exc:
                    kind = "timeout" if isinstance(exc, self.sdk.APITimeoutError) else "connection"
                    message = f"{type(exc).__name__}: {exc} (after {local.calls} tries)"
                    raise TransportError(scrub(message, session.key), kind=kind) from None
                try:
                    return self.reply_text(reply)
                except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
                    problem = f"unreadable response body ({type(exc).__name__}: {exc})"
                    if body_try >= s.max_retries:
                        message = scrub(f"{problem} (after {local.calls} tries)", session.key)
                        raise TransportError(message, kind="unreadable", status=200) from None
                    log.info("%s %s: retry after %s", self.name, s.model, scrub(problem, session.key))
                    await asyncio.sleep(s.backoff_base_s * (2**body_try) * (0.5 + random.random() / 2))
            raise AssertionError("unreachable")
        finally:
            _ATTEMPTS.reset(token)
            stats.backend_calls += local.calls
            stats.http_retries += max(0, local.calls - 1)
            if tally is not None:
                tally.calls += local.calls


class AnthropicBackend(ChatBackend):
    """Anthropic Messages API through ``anthropic.AsyncAnthropic`` (``POST {base_url}/v1/messages``)."""

    name = "anthropic"

    @property
    def sdk(self) -> Any:
        import anthropic

        return anthropic

    @property
    def client_class(self) -> Any:
        return self.sdk.AsyncAnthropic

    async def _create(self, session, system, messages, temperature, max_tokens):
        # temperature goes in the body: newer SDKs dropped the keyword, the API still takes it
        return await session.client.messages.create(
            model=self.settings.model,
            max_tokens=max_tokens,
            system=system,
            messages=messages,
            extra_body={"temperature": temperature} if temperature is not None else None,
        )

    def reply_text(self, reply):
        text = "".join(b.text for b in reply.content if getattr(b, "type", None) == "text")
        return Reply.of(text, getattr(reply, "stop_reason", None) == "max_tokens")


class OpenAICompatBackend(ChatBackend):
    """OpenAI-style Chat Completions through ``openai.AsyncOpenAI`` (``POST {base_url}/chat/completions``, where
    ``base_url`` ends in ``/v1``), with a Bearer key when one is configured; local servers (vLLM, llama.cpp, ollama)
    usually need none, and then no Authorization header is sent."""

    name = "openai_compat"
    key_required = False

    @property
    def sdk(self) -> Any:
        import openai

        return openai

    @property
    def client_class(self) -> Any:
        return self.sdk.AsyncOpenAI

    async def _create(self, session, system, messages, temperature, max_tokens):
        kwargs: dict[str, Any] = {}
        if temperature is not None:
            kwargs["temperature"] = temperature
        return await session.client.chat.completions.create(
            model=self.settings.model,
            max_tokens=max_tokens,
            messages=[{"role": "system", "content": system}, *messages],
            extra_headers=None if session.key else {"Authorization": self.sdk.Omit()},
            **kwargs,
        )

    def reply_text(self, reply):
        choice = reply.choices[0]
        content = choice.message.content
        return Reply.of(content if isinstance(content, str) else "", getattr(choice, "finish_reason", None) == "length")


def chat_rate_limiter(chat: ChatBackend, cache: Any = None) -> RateLimiter:
    """The rate limiter of a client calling ``chat`` (an LLM judge, the concreteness grader): shared with every
    process and client that calls the same backend, base URL and model through the same cache directory (all grade
    and selection jobs of a run: one API key's limit), per process without a cache (``make_rate_limiter``)."""
    return make_rate_limiter(
        chat.settings.rate_limit_per_s,
        cache_dir=getattr(cache, "root", None),
        backend=chat.name,
        base_url=chat.settings.base_url,
        model=chat.settings.model,
    )


@dataclass(frozen=True)
class LLMJudgeSettings:
    """The resolved settings an ``LLMJudge`` runs from; its cache key is derived from them (``key_fields``).

    ``json_block``: which valid verdict in a reply counts, ``last`` (default) or ``first`` (the authors took the
    first ``<json>`` block). ``max_parse_retries``: corrective re-asks after a malformed verdict (in the key: a parse
    error is cached). ``reask_temperature``: re-asks use ``max(temperature, reask_temperature)`` (null temperature =
    provider default: sent as is). ``restart_gate``: merge judge attempts not at restart language;
    ``restart_patterns``: the version of the restart patterns the gate uses (None when the gate is off)."""

    backend: str
    chat: ChatSettings
    template_version: str = JUDGE_TEMPLATE_VERSION
    reask_version: str = JUDGE_REASK_VERSION
    json_block: str = "last"
    max_parse_retries: int = 2
    reask_temperature: float | None = 0.7
    restart_gate: bool = False
    restart_patterns: str | None = None

    def __post_init__(self) -> None:
        if self.json_block not in BLOCK_CHOICES:
            raise ValueError(f"judge.json_block must be one of {BLOCK_CHOICES}, got {self.json_block!r}")
        if self.max_parse_retries < 0:
            raise ValueError(f"judge.max_parse_retries must be >= 0, got {self.max_parse_retries}")

    def reask_temp(self) -> float | None:
        """Temperature of corrective re-asks."""
        t = self.chat.temperature
        if t is None or self.reask_temperature is None:
            return t
        return max(t, self.reask_temperature)


class LLMJudge(Judge):
    """An LLM judge on a chat backend: our prompt, robust parsing with corrective re-asks, and the optional restart
    gate. Keyword options are the ``LLMJudgeSettings`` fields (see there)."""

    template_version = JUDGE_TEMPLATE_VERSION

    def __init__(
        self,
        chat: ChatBackend,
        *,
        restart_gate: bool = False,
        max_parse_retries: int = 2,
        json_block: str = "last",
        reask_temperature: float | None = 0.7,
        cache=None,
        concurrency: int = 4,
        show_progress: bool = True,
        max_consecutive_failures: int | None = DEFAULT_MAX_CONSECUTIVE_FAILURES,
        retry_failed: bool | None = None,
    ) -> None:
        super().__init__(
            cache=cache,
            concurrency=concurrency,
            show_progress=show_progress,
            max_consecutive_failures=max_consecutive_failures,
            retry_failed=retry_failed,
        )
        self.chat = chat
        self.settings = LLMJudgeSettings(
            backend=chat.name,
            chat=chat.settings,
            json_block=json_block,
            max_parse_retries=int(max_parse_retries),
            reask_temperature=reask_temperature,
            restart_gate=bool(restart_gate),
            restart_patterns=RESTART_PATTERN_VERSION if restart_gate else None,
        )
        self.limiter = chat_rate_limiter(chat, cache)
        self.backend = chat.name
        self.model = chat.settings.model

    @property
    def restart_gate(self) -> bool:
        return self.settings.restart_gate

    @property
    def max_parse_retries(self) -> int:
        return self.settings.max_parse_retries

    def replace_settings(self, **changes: Any) -> None:
        """New settings (``LLMJudgeSettings`` fields, or ``ChatSettings`` fields under ``chat=``)."""
        if "chat" in changes and isinstance(changes["chat"], dict):
            changes["chat"] = dataclasses.replace(self.settings.chat, **changes["chat"])
        self.settings = dataclasses.replace(self.settings, **changes)
        self.chat = type(self.chat)(self.settings.chat)
        self.model = self.settings.chat.model

    async def _open(self) -> ChatSession:
        return self.chat.open_session(concurrency=self.concurrency, limiter=self.limiter)

    async def _close(self, ctx: ChatSession) -> None:
        await ctx.aclose()

    async def _agrade_uncached(self, request: JudgeRequest, ctx: ChatSession) -> JudgeResult:
        s = self.settings
        system, user = judge_messages(request.prompt, request.response, request.latent_label)
        messages = [{"role": "user", "content": user}]
        temperature = s.chat.temperature
        tally = CallTally()
        failures: list[str] = []
        raw: str | None = None
        truncated = False
        for parse_try in range(s.max_parse_retries + 1):
            try:
                reply = await self.chat.complete(
                    ctx, system, messages, stats=self.stats, tally=tally, temperature=temperature
                )
                raw = scrub(reply, ctx.key)
                truncated = getattr(reply, "truncated", False)
            except TransportError as exc:
                res = self._error_result(str(exc), exc.kind, raw, tally.calls)
                res.metadata.update(parse_failures=failures, http_status=exc.status)
                return res
            try:
                attempts = parse_attempts(raw, block=s.json_block)
            except MalformedJudgeOutput as exc:
                failures.append(str(exc))
                if parse_try < s.max_parse_retries:
                    self.stats.parse_retries += 1
                    log.info("%s: malformed verdict (%s); re-asking with a correction", self.judge_id, exc)
                    # a corrective turn, not a repeat: a temperature-0 judge would give the same reply again
                    messages = [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": raw or "(empty reply)"},
                        {"role": "user", "content": judge_reask(str(exc))},
                    ]
                    temperature = s.reask_temp()
                continue
            metadata: dict[str, Any] = {"parse_failures": failures}
            if s.restart_gate:
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
        kind, why = ("truncated", "cut at max_tokens") if truncated else ("parse", "malformed judge output")
        res = self._error_result(
            f"{why} after {s.max_parse_retries + 1} replies: {failures[-1]}", kind, raw, tally.calls
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


_JUDGE_KWARGS = (
    "restart_gate",
    "max_parse_retries",
    "json_block",
    "reask_temperature",
    "cache",
    "concurrency",
    "show_progress",
    "max_consecutive_failures",
    "retry_failed",
)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    judge = {k: kwargs.pop(k) for k in list(kwargs) if k in _JUDGE_KWARGS}
    return kwargs, judge

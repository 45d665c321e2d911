"""The judge interface: requests, results, counters, and the ``Judge`` base class with caching and batch grading.

A *judge* reads (prompt, response, steered latent label) and returns the response split into attempts, each scored
0-100 for how well it answers the prompt. Every backend (Anthropic, OpenAI-compatible, offline MiniLM, fake) is a
subclass of ``Judge`` and implements ``_agrade_uncached``; this base class adds the content-addressed cache, bounded
concurrency, progress bars and the per-batch counters, so a backend never has to think about them."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esr.io import stable_hash
from esr.judge.settings import key_fields

log = logging.getLogger(__name__)

#: error kinds of a request the transport could not complete (after the SDK's retries): ``http`` (an error status),
#: ``timeout`` (no answer within ``timeout_s``), ``connection`` (the server could not be reached), ``unreadable``
#: (a 200 reply whose body is not a chat reply)
TRANSPORT_KINDS = ("http", "timeout", "connection", "unreadable")
#: HTTP statuses that say the *service* is busy, overloaded or unreachable (not that this request is bad): such
#: failures are never remembered in the cache
SERVICE_STATUSES = frozenset({408, 409, 429, 502, 503, 504, 529})
#: environment variable that makes a run re-send requests whose permanent failure is remembered in the cache
RETRY_FAILED_ENV = "ESR_RETRY_FAILED"
DEFAULT_MAX_CONSECUTIVE_FAILURES = 20


class JudgeFatalError(RuntimeError):
    """An error that stops the whole batch at once (outstanding requests are cancelled) instead of being recorded
    on one trial: bad credentials, or too many consecutive failures."""


class JudgeAuthError(JudgeFatalError):
    """The judge's API refused our credentials (HTTP 401/403). The message names the backend and the environment
    variable holding the key, never the key."""


class JudgeCircuitOpen(JudgeFatalError):
    """``max_consecutive_failures`` requests in a row failed (transport errors or unexpected exceptions): the
    service is down or misconfigured, and the rest of the batch is not sent."""


def retry_failed_from_env() -> bool:
    """Whether ``ESR_RETRY_FAILED`` asks to re-send remembered failures (``1``/``true``/``yes``)."""
    return os.environ.get(RETRY_FAILED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def remembered(res: JudgeResult) -> bool:
    """Whether a failed result is remembered in the cache as a permanent failure (not re-sent by later jobs): a
    transport failure where the server answered (an error status other than ``SERVICE_STATUSES``, 401/403 aside,
    which stop the run; or an unreadable body). Timeouts, connection errors and busy/overloaded statuses say
    nothing about the request and are re-sent by the next job."""
    if res.error_kind == "unreadable":
        return True
    status = res.metadata.get("http_status")
    return res.error_kind == "http" and isinstance(status, int) and status not in SERVICE_STATUSES


@dataclass(frozen=True)
class Attempt:
    """One attempt inside an answer, as split by the judge, with its 0-100 score (None if the judge gave none)."""

    text: str
    score: float | None


@dataclass(frozen=True)
class JudgeRequest:
    """One answer to grade: the user prompt, the model's response, the steered latent's label, and an optional
    trial id that is carried through to the result (it is not part of the cache key)."""

    prompt: str
    response: str
    latent_label: str
    trial_id: str | None = None


@dataclass
class JudgeResult:
    """What a judge said about one answer.

    ``attempts``: the answer split into attempts with 0-100 scores (empty on error, or when the judge found no
    attempt). ``raw_text``: the judge's full reply (kept on parse errors too; None for judges without text output).
    ``judge_id``: backend and model (e.g. ``anthropic:claude-haiku-4-5-20251001``). ``template_version``: the judge
    prompt version. ``error``: None on success, else a message; ``error_kind`` is ``parse`` (the judge answered but
    never in a valid format), ``truncated`` (likewise, and its last reply stopped at max_tokens), one of
    ``TRANSPORT_KINDS`` (``http``, ``timeout``, ``connection``, ``unreadable``: the request failed after the
    transport's retries; ``metadata['http_status']`` holds the status) or ``other`` (an unexpected exception). Successes
    and ``parse``/``truncated`` errors are cached as results; transport failures that :func:`remembered` accepts are
    cached as failure entries (served again, not re-sent, unless ``ESR_RETRY_FAILED=1``:
    ``metadata['remembered_failure']`` is then set); the others are re-sent by the next run. ``cached``: served
    from the cache. ``n_calls``: backend calls spent on it in this run (0 when cached, or when it shares the answer
    of an identical request of the same batch: ``metadata['duplicate']``). ``metadata``: backend specifics (e.g.
    ``approximation: true`` and the calibration for the offline judge; merges done by the restart gate)."""

    attempts: list[Attempt]
    raw_text: str | None
    judge_id: str
    template_version: str
    error: str | None = None
    error_kind: str | None = None
    cache_key: str | None = None
    cached: bool = False
    n_calls: int = 0
    trial_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def scores(self) -> list[float]:
        return [a.score for a in self.attempts if a.score is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (attempts as ``{"text", "score"}`` objects)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JudgeResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["attempts"] = [Attempt(text=a["text"], score=a["score"]) for a in data.get("attempts", [])]
        kwargs["metadata"] = dict(data.get("metadata") or {})
        return cls(**kwargs)


@dataclass
class JudgeStats:
    """Counters for one judge instance (summed over its batches): requests, cache hits and misses (distinct
    requests sent), ``duplicates`` (requests answered by an identical one of the same batch, not sent),
    ``failures_remembered`` (served from a failure entry, not sent) and ``failures_stored``, backend calls, retries by
    cause, and final errors by kind. Reported by the judge stage next to its results."""

    requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    duplicates: int = 0
    failures_remembered: int = 0
    failures_stored: int = 0
    backend_calls: int = 0
    http_retries: int = 0
    parse_retries: int = 0
    errors_parse: int = 0
    errors_truncated: int = 0
    errors_http: int = 0
    errors_timeout: int = 0
    errors_connection: int = 0
    errors_unreadable: int = 0
    errors_other: int = 0
    gate_merges: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Judge:
    """Base class of all judges. Subclasses set ``backend``, ``model`` and ``settings`` and implement
    ``_agrade_uncached``.

    ``settings``: the frozen dataclass of resolved settings the judge runs from; the cache key is derived from it
    (``esr.judge.settings.key_fields``: every field except those marked ``not_in_key``), so a new setting cannot be
    forgotten. ``cache``: a ``JudgeCache`` or None. ``concurrency``: how many requests are in flight at once in a
    batch. ``show_progress``: a progress line (answers, rate, ETA) in the log. ``max_consecutive_failures``: the
    circuit breaker: after this many failed requests in a row (transport errors or unexpected exceptions; counted
    across batches) the batch stops with ``JudgeCircuitOpen`` (None: never). ``retry_failed``: re-send requests
    whose permanent failure is remembered in the cache (None: ``ESR_RETRY_FAILED`` decides, default no)."""

    backend: str = "base"
    model: str = ""
    template_version: str = ""
    approximation: bool = False
    settings: Any = None

    def __init__(
        self,
        *,
        cache=None,
        concurrency: int = 4,
        show_progress: bool = True,
        max_consecutive_failures: int | None = DEFAULT_MAX_CONSECUTIVE_FAILURES,
        retry_failed: bool | None = None,
    ) -> None:
        self.cache = cache
        self.concurrency = max(1, int(concurrency))
        self.show_progress = show_progress
        if max_consecutive_failures is not None and int(max_consecutive_failures) < 1:
            raise ValueError(f"judge.max_consecutive_failures must be >= 1 or null, got {max_consecutive_failures}")
        self.max_consecutive_failures = None if max_consecutive_failures is None else int(max_consecutive_failures)
        self.retry_failed = retry_failed
        self.stats = JudgeStats()
        self._failure_streak = 0
        self._pending_failures: list[tuple[str, JudgeRequest, JudgeResult]] = []

    # ----------------------------------------------------------------------------------------------- identity
    @property
    def judge_id(self) -> str:
        """Human-readable id stored with every result, e.g. ``anthropic:claude-haiku-4-5-20251001``."""
        return f"{self.backend}:{self.model}"

    def cache_identity(self) -> dict[str, Any]:
        """Everything about this judge that can change a stored result: ``key_fields(self.settings)``."""
        if self.settings is None:
            raise TypeError(f"{type(self).__name__} has no settings dataclass; its cache key would be incomplete")
        return key_fields(self.settings)

    def cache_key(self, request: JudgeRequest) -> str:
        """Content address of a request under this judge's settings (trial id excluded): a SHA-256 hex string of
        (``cache_identity()``, prompt, response, latent label)."""
        return stable_hash(
            {
                "judge": self.cache_identity(),
                "prompt": request.prompt,
                "response": request.response,
                "latent_label": request.latent_label,
            }
        )

    def describe(self) -> dict[str, Any]:
        """Provenance block for this judge (no secrets: settings hold only the *name* of the key variable)."""
        return {
            "judge_id": self.judge_id,
            "backend": self.backend,
            "model": self.model,
            "template_version": self.template_version,
            "approximation": self.approximation,
            "settings": _jsonable(self.settings),
        }

    # ----------------------------------------------------------------------------------------------- grading
    async def _agrade_uncached(self, request: JudgeRequest, ctx: Any) -> JudgeResult:
        raise NotImplementedError

    async def _open(self) -> Any:
        """Per-batch context (HTTP client, rate limiter); closed by ``_close``."""
        return None

    async def _close(self, ctx: Any) -> None:
        return None

    def grade(self, prompt: str, response: str, latent_label: str) -> JudgeResult:
        """Grade one answer (synchronous; uses the cache)."""
        return self.grade_batch([JudgeRequest(prompt, response, latent_label)], show_progress=False)[0]

    def grade_batch(self, requests: Sequence[JudgeRequest], show_progress: bool | None = None) -> list[JudgeResult]:
        """Grade many answers, in input order. Must not be called from inside a running event loop (use
        ``agrade_batch`` there)."""
        return asyncio.run(self.agrade_batch(requests, show_progress=show_progress))

    async def agrade_batch(
        self, requests: Sequence[JudgeRequest], show_progress: bool | None = None
    ) -> list[JudgeResult]:
        """Grade many answers concurrently (at most ``concurrency`` in flight), results in input order.

        Cached answers cost nothing, and neither do remembered permanent failures (unless ``retry_failed``).
        Identical requests (same cache key) are sent once and the answer is given to each of them. Each fresh
        result is written to the cache as soon as it arrives, so a crash (even ``kill -9``) loses at most the
        ``concurrency`` requests in flight. One failing answer never stops the batch: it comes back with ``error``
        set. Raises ``JudgeAuthError`` (credentials refused) and ``JudgeCircuitOpen`` (``max_consecutive_failures``
        failures in a row); either way the outstanding requests are cancelled first."""
        requests = list(requests)
        results: list[JudgeResult | None] = [None] * len(requests)
        todo: list[tuple[int, JudgeRequest, str]] = []
        first_of: dict[str, int] = {}  # cache key -> index of the request that is sent
        duplicates: list[tuple[int, int]] = []  # (index, index of the identical request sent)
        retry_failed = retry_failed_from_env() if self.retry_failed is None else self.retry_failed
        for i, req in enumerate(requests):
            self.stats.requests += 1
            key = self.cache_key(req)
            if key in first_of:
                self.stats.duplicates += 1
                duplicates.append((i, first_of[key]))
                continue
            first_of[key] = i
            kind, stored = (self.cache.lookup(key) if self.cache is not None else None) or (None, None)
            if kind == "result":
                self.stats.cache_hits += 1
                res = JudgeResult.from_dict(stored)
                res.cached, res.n_calls, res.trial_id, res.cache_key = True, 0, req.trial_id, key
                results[i] = res
                continue
            if kind == "failure" and not retry_failed:
                self.stats.failures_remembered += 1
                results[i] = self._remembered_failure(stored, req, key)
                self._count(results[i])
                continue
            self.stats.cache_misses += 1
            todo.append((i, req, key))
        if todo:
            await self._grade_misses(todo, results, show_progress)
            self._store_failures()
        n = sum(1 for r in results if r is not None and "remembered_failure" in r.metadata)
        if n:
            log.warning(
                "judge %s: %d request(s) failed permanently in an earlier job and were not re-sent (their trials "
                "carry the error); set %s=1 to re-send them",
                self.judge_id,
                n,
                RETRY_FAILED_ENV,
            )
        for i, j in duplicates:  # fan the answer out to every identical request
            res = copy.deepcopy(results[j])
            res.trial_id, res.n_calls = requests[i].trial_id, 0
            res.metadata["duplicate"] = True
            results[i] = res
        return [r for r in results if r is not None]

    def _remembered_failure(self, failure: dict[str, Any], req: JudgeRequest, key: str) -> JudgeResult:
        """The error result of a request whose permanent failure an earlier job stored (not re-sent)."""
        kind = failure.get("error_kind") or "http"
        message = (
            f"remembered failure ({failure.get('failed_utc')}; {RETRY_FAILED_ENV}=1 re-sends): {failure.get('error')}"
        )
        res = self._error_result(message, kind)
        res.metadata.update(http_status=failure.get("status"), remembered_failure=failure)
        res.cached, res.trial_id, res.cache_key = True, req.trial_id, key
        return res

    async def _grade_misses(self, todo, results, show_progress) -> None:
        ctx = await self._open()
        bar = _progress(
            len(todo), f"judge {self.judge_id}", self.show_progress if show_progress is None else show_progress
        )
        sem = asyncio.Semaphore(self.concurrency)
        try:

            async def one(i: int, req: JudgeRequest, key: str) -> None:
                async with sem:
                    try:
                        res = await self._agrade_uncached(req, ctx)
                    except JudgeFatalError:
                        raise
                    except Exception as exc:  # a bug or an unexpected failure in one item must not stop the batch
                        res = self._error_result(f"{type(exc).__name__}: {exc}", "other")
                self._finish(req, key, res)
                results[i] = res
                bar.update(1)

            tasks = [asyncio.ensure_future(one(i, r, k)) for i, r, k in todo]
            try:
                await asyncio.gather(*tasks)
            finally:  # on a crash (auth error, open circuit, a full cache disk) cancel the rest before closing
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            bar.close()
            await self._close(ctx)

    def _finish(self, req: JudgeRequest, key: str, res: JudgeResult) -> None:
        """Book one fresh result: counters, cache (a result now; a permanent failure at the end of the batch), and
        the circuit breaker (raises ``JudgeCircuitOpen``)."""
        res.cache_key, res.trial_id = key, req.trial_id
        self._count(res)
        if res.error_kind in (None, "parse", "truncated"):  # the judge answered
            self._failure_streak = 0
            if self.cache is not None:
                self.cache.put(
                    key, _cacheable(res), inputs={"judge": self.cache_identity(), "request": _request_inputs(req)}
                )
            return
        self._failure_streak += 1
        if remembered(res):
            self._pending_failures.append((key, req, res))
        limit = self.max_consecutive_failures
        if limit is not None and self._failure_streak >= limit:
            self._pending_failures.clear()  # an outage, not bad requests: the next job sends them again
            raise JudgeCircuitOpen(
                f"judge {self.judge_id}: {self._failure_streak} requests failed in a row "
                f"(max_consecutive_failures = {limit}); the last: [{res.error_kind}] {res.error}. Stopping the batch: "
                "check the service, its URL and limits, then rerun (answers already received are cached)"
            )

    def _store_failures(self) -> None:
        """Write the batch's permanent failures to the cache as failure entries (not re-sent by later jobs)."""
        pending, self._pending_failures = self._pending_failures, []
        if self.cache is None:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key, req, res in pending:
            failure = {
                "error_kind": res.error_kind,
                "status": res.metadata.get("http_status"),
                "error": res.error,
                "failed_utc": now,
                "n_calls": res.n_calls,
                "judge_id": self.judge_id,
            }
            inputs = {"judge": self.cache_identity(), "request": _request_inputs(req)}
            if self.cache.put_failure(key, failure, inputs=inputs) is not None:
                self.stats.failures_stored += 1

    def _count(self, res: JudgeResult) -> None:
        kind = res.error_kind if res.error is not None else None
        if kind is None:
            return
        name = f"errors_{kind}"
        if hasattr(self.stats, name):
            setattr(self.stats, name, getattr(self.stats, name) + 1)
        else:
            self.stats.errors_other += 1

    def _error_result(self, message: str, kind: str, raw_text: str | None = None, n_calls: int = 0) -> JudgeResult:
        return JudgeResult(
            attempts=[],
            raw_text=raw_text,
            judge_id=self.judge_id,
            template_version=self.template_version,
            error=message,
            error_kind=kind,
            n_calls=n_calls,
            metadata=self._base_metadata(),
        )

    def _base_metadata(self) -> dict[str, Any]:
        return {"approximation": True} if self.approximation else {}


def _cacheable(res: JudgeResult) -> dict[str, Any]:
    """The stored form of a result: per-run fields (cached, n_calls, trial id) are reset."""
    d = res.to_dict()
    d.update(cached=False, trial_id=None)
    return d


def _jsonable(settings: Any) -> Any:
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings


def _request_inputs(req: JudgeRequest) -> dict[str, Any]:
    return {"prompt": req.prompt, "response": req.response, "latent_label": req.latent_label}


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total <= 1:
        return _NullBar()
    from esr.progress import Progress

    return Progress(total=total, desc=desc, unit="answers", min_interval_s=10.0)

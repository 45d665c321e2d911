"""The judge interface: requests, results, counters, and the ``Judge`` base class with caching and batch grading.

A *judge* reads (prompt, response, steered latent label) and returns the response split into attempts, each scored
0-100 for how well it answers the prompt. Every backend (Anthropic, OpenAI-compatible, offline MiniLM, fake) is a
subclass of ``Judge`` and implements ``_agrade_uncached``; this base class adds the content-addressed cache, bounded
concurrency, progress bars and the per-batch counters, so a backend never has to think about them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esr.io import stable_hash
from esr.judge.settings import key_fields


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
    never in a valid format), ``truncated`` (likewise, and its last reply stopped at max_tokens), ``http`` (transport/API failure) or ``other`` (an unexpected exception). Only
    successes and ``parse``/``truncated`` errors are cached; ``http``/``other`` errors are retried on the next run. ``cached``:
    served from the cache. ``n_calls``: backend calls spent on it in this run (0 when cached). ``metadata``:
    backend specifics (e.g.
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
    """Counters for one judge instance (summed over its batches): cache hits and misses, backend calls, retries
    by cause, and final errors by kind. Reported by the judge stage next to its results."""

    requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    backend_calls: int = 0
    http_retries: int = 0
    parse_retries: int = 0
    errors_parse: int = 0
    errors_truncated: int = 0
    errors_http: int = 0
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
    batch. ``show_progress``: tqdm bar over batches."""

    backend: str = "base"
    model: str = ""
    template_version: str = ""
    approximation: bool = False
    settings: Any = None

    def __init__(self, *, cache=None, concurrency: int = 4, show_progress: bool = True) -> None:
        self.cache = cache
        self.concurrency = max(1, int(concurrency))
        self.show_progress = show_progress
        self.stats = JudgeStats()

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
        """Grade many answers concurrently (at most ``concurrency`` in flight). Cached answers cost nothing; each
        fresh result is written to the cache as soon as it arrives, so a crash loses at most the in-flight ones.
        One failing answer never stops the batch: it comes back with ``error`` set."""
        requests = list(requests)
        results: list[JudgeResult | None] = [None] * len(requests)
        todo: list[tuple[int, JudgeRequest, str]] = []
        for i, req in enumerate(requests):
            self.stats.requests += 1
            key = self.cache_key(req)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                self.stats.cache_hits += 1
                res = JudgeResult.from_dict(hit)
                res.cached, res.n_calls, res.trial_id, res.cache_key = True, 0, req.trial_id, key
                results[i] = res
            else:
                self.stats.cache_misses += 1
                todo.append((i, req, key))
        if todo:
            await self._grade_misses(todo, results, show_progress)
        return [r for r in results if r is not None]

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
                    except Exception as exc:  # a bug or an unexpected failure in one item must not stop the batch
                        res = self._error_result(f"{type(exc).__name__}: {exc}", "other")
                res.cache_key, res.trial_id = key, req.trial_id
                self._count(res)
                if self.cache is not None and res.error_kind in (None, "parse", "truncated"):
                    self.cache.put(
                        key, _cacheable(res), inputs={"judge": self.cache_identity(), "request": _request_inputs(req)}
                    )
                results[i] = res
                bar.update(1)

            tasks = [asyncio.ensure_future(one(i, r, k)) for i, r, k in todo]
            try:
                await asyncio.gather(*tasks)
            finally:  # on a crash (e.g. the cache disk is full) stop the rest before closing the client
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            bar.close()
            await self._close(ctx)

    def _count(self, res: JudgeResult) -> None:
        if res.error_kind == "parse":
            self.stats.errors_parse += 1
        elif res.error_kind == "truncated":
            self.stats.errors_truncated += 1
        elif res.error_kind == "http":
            self.stats.errors_http += 1
        elif res.error is not None:
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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="answer", leave=False)

"""Concreteness grading of latent labels (0-100; the paper keeps labels scoring >= 65).

Two graders with one interface (``grade_labels(labels) -> list[ConcretenessScore]``, ``select(labels)``):

* ``LLMConcretenessGrader``: batches of labels sent to a chat backend (Anthropic or OpenAI-compatible), one JSON
  rating per label back, cached per label. A batch whose reply never parses (after re-asks) or whose API calls fail
  is handled by ``fail_mode``: ``closed`` (the paper's behaviour: every label of the batch scores 0 and is dropped)
  or ``error`` (score None). Either way each such label is marked ``failed_closed``/``error`` and counted in
  ``stats``: nothing fails silently.
* ``WordNetConcreteness``: an offline heuristic (an APPROXIMATION of the paper's Claude Sonnet 4.5 grader). A content
  word is concrete when its most frequent noun sense is in a concrete WordNet supersense (animal, food, plant,
  artifact, body, location, object, substance) and at least a quarter of all its senses are concrete nouns. Score =
  100 * concrete lemmas / content lemmas, capped at 50 unless the label is coherent (>= 2 distinct concrete lemmas,
  or at least half its content lemmas concrete, and no more function words than content lemmas). A noun that the
  SemCor corpus only ever tags as another part of speech ("forth") is not concrete."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esr.io import stable_hash
from esr.judge.base import _progress
from esr.judge.http_backends import CallTally, ChatBackend, TransportError, chat_rate_limiter, scrub
from esr.judge.parsing import MalformedJudgeOutput, parse_concreteness
from esr.judge.prompts import (
    CONCRETENESS_TEMPLATE_VERSION,
    JUDGE_REASK_VERSION,
    concreteness_messages,
    concreteness_reask,
)
from esr.judge.settings import key_fields
from esr.judge.wordnet import DEFAULT_WORDNET_DIR, WordNet

PAPER_CONCRETENESS_MODEL = "claude-sonnet-4-5-20250929"
PAPER_THRESHOLD = 65.0
WORDNET_GRADER_ID = "offline-wordnet-concreteness (approximation)"
WORDNET_TEMPLATE_VERSION = "wordnet-concreteness-v2"

CONCRETE_SUPERSENSES = frozenset(
    {
        "noun.animal",
        "noun.food",
        "noun.plant",
        "noun.artifact",
        "noun.body",
        "noun.location",
        "noun.object",
        "noun.substance",
    }
)
STOPWORDS = frozenset(
    """
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either etc few for from further had has have having he her here
hers him his how i if in into is it its itself just may me might more most my no nor not of off on once only or
other our out over own same she should so some such than that the their them then there these they this those
through to too under until up upon very via was we were what when where which while who whom why will with would
you your
till unto amid amidst whilst whereas hence thus forth versus towards toward within without onto among
""".split()
)
# words that describe the label rather than its topic ("mentions of ...", "tokens related to ...")
META_WORDS = frozenset(
    """
reference references referring mention mentions mentioning term terms word words text texts token tokens phrase
phrases concept concepts context contexts related relating relation topic topics usage use uses using discussion
discussions description descriptions instance instances example examples various specific general thing things
type types kind kinds aspect aspects content feature features pattern patterns sequence sequences language
""".split()
)
_WORD = re.compile(r"[A-Za-z]+")


@dataclass
class ConcretenessScore:
    """One label's concreteness. ``score`` is None only for ``fail_mode='error'`` failures. ``failed_closed``: the
    score is the fail-closed 0, not a rating. ``cached``: served from the cache."""

    label: str
    score: float | None
    grader_id: str
    template_version: str
    approximation: bool = False
    reason: str = ""
    error: str | None = None
    failed_closed: bool = False
    cached: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def passes(self, threshold: float = PAPER_THRESHOLD) -> bool:
        return self.score is not None and not self.failed_closed and self.score >= threshold


@dataclass
class ConcretenessStats:
    """Counters over all batches of one grader."""

    labels: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    backend_calls: int = 0
    http_retries: int = 0
    parse_retries: int = 0
    failed_batches: int = 0
    failed_closed: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Grader:
    grader_id = ""
    template_version = ""
    approximation = False

    def __init__(self, threshold: float = PAPER_THRESHOLD) -> None:
        self.threshold = threshold
        self.stats = ConcretenessStats()

    def grade_labels(self, labels: Sequence[str]) -> list[ConcretenessScore]:
        raise NotImplementedError

    def select(self, labels: Sequence[str]) -> list[str]:
        """The labels scoring at least ``threshold`` (fail-closed labels never pass), in input order."""
        return [s.label for s in self.grade_labels(labels) if s.passes(self.threshold)]

    def describe(self) -> dict[str, Any]:
        return {
            "grader_id": self.grader_id,
            "template_version": self.template_version,
            "approximation": self.approximation,
            "threshold": self.threshold,
        }


class WordNetConcreteness(_Grader):
    """Offline WordNet heuristic (approximation; see module docstring). ``wordnet_dir``: the database directory."""

    grader_id = WORDNET_GRADER_ID
    template_version = WORDNET_TEMPLATE_VERSION
    approximation = True

    def __init__(
        self,
        wordnet_dir: str = str(DEFAULT_WORDNET_DIR),
        threshold: float = PAPER_THRESHOLD,
        min_sense_ratio: float = 0.25,
    ) -> None:
        super().__init__(threshold)
        self.wordnet = WordNet(wordnet_dir)
        self.min_sense_ratio = min_sense_ratio

    def word_is_concrete(self, word: str) -> bool:
        lexnames = self.wordnet.noun_lexnames(word)
        if not lexnames or lexnames[0] not in CONCRETE_SUPERSENSES:
            return False
        if self.wordnet.tagged_senses(word, "n") == 0 and any(
            self.wordnet.tagged_senses(word, pos) for pos in ("v", "a", "r")
        ):
            return False  # used only as a verb/adjective/adverb in running text ("forth": the River Forth aside)
        concrete = sum(name in CONCRETE_SUPERSENSES for name in lexnames)
        return concrete / max(1, self.wordnet.n_senses(word)) >= self.min_sense_ratio

    def score_label(self, label: str) -> ConcretenessScore:
        lemmas: dict[str, bool] = {}
        n_function = 0
        for word in _WORD.findall(label):
            low = word.lower()
            n_function += low in STOPWORDS
            if len(low) < 3 or low in STOPWORDS or low in META_WORDS:
                continue
            lemma = self.wordnet.base_form(low, "n") or low
            lemmas[lemma] = lemmas.get(lemma, False) or self.word_is_concrete(low)
        concrete = sorted(lemma for lemma, is_concrete in lemmas.items() if is_concrete)
        frac = len(concrete) / len(lemmas) if lemmas else 0.0
        # a label made mostly of function words ("which, to, boundary, will, can, a") names a syntactic latent
        coherent = (len(concrete) >= 2 or frac >= 0.5) and n_function <= len(lemmas)
        score = 100.0 * frac if coherent else min(100.0 * frac, 50.0)
        return ConcretenessScore(
            label=label,
            score=round(score, 2),
            grader_id=self.grader_id,
            template_version=self.template_version,
            approximation=True,
            details={
                "content_lemmas": sorted(lemmas),
                "concrete_lemmas": concrete,
                "function_words": n_function,
                "coherent": coherent,
            },
        )

    def grade_labels(self, labels: Sequence[str]) -> list[ConcretenessScore]:
        self.stats.labels += len(labels)
        return [self.score_label(label) for label in labels]


class LLMConcretenessGrader(_Grader):
    """LLM concreteness grader on a chat backend. ``batch_size`` labels per call (paper: 50); ``fail_mode``:
    ``closed`` or ``error``; ``cache``: a ``JudgeCache`` (entries keyed by grader identity + label text)."""

    template_version = CONCRETENESS_TEMPLATE_VERSION

    def __init__(
        self,
        chat: ChatBackend,
        *,
        batch_size: int = 50,
        threshold: float = PAPER_THRESHOLD,
        fail_mode: str = "closed",
        max_parse_retries: int = 2,
        reask_temperature: float | None = 0.7,
        concurrency: int = 2,
        cache=None,
        show_progress: bool = True,
    ) -> None:
        super().__init__(threshold)
        if fail_mode not in ("closed", "error"):
            raise ValueError("fail_mode must be 'closed' or 'error'")
        self.chat = chat
        self.batch_size = max(1, batch_size)
        self.fail_mode = fail_mode
        self.max_parse_retries = max_parse_retries
        self.reask_temperature = reask_temperature
        self.concurrency = max(1, concurrency)
        self.cache = cache
        self.show_progress = show_progress
        # one schedule with every process (and judge) calling the same endpoint and model through the same cache
        # directory, e.g. five select_latents jobs at once (as the LLM judges)
        self.limiter = chat_rate_limiter(chat, cache)

    @property
    def grader_id(self) -> str:  # type: ignore[override]
        return f"{self.chat.name}:{self.chat.settings.model}"

    def _identity(self) -> dict[str, Any]:
        """Everything that can change a stored rating: the chat settings' key fields (model, base URL,
        temperature, max tokens, ...), the prompt and re-ask versions, the batch size (labels are rated in context)
        and the re-ask budget (a failed batch is not cached, but the budget decides whether it fails)."""
        return {
            "task": "concreteness",
            "backend": self.chat.name,
            "template_version": self.template_version,
            "reask_version": JUDGE_REASK_VERSION,
            "batch_size": self.batch_size,
            "max_parse_retries": self.max_parse_retries,
            "reask_temperature": self.reask_temperature,
            "chat": key_fields(self.chat.settings),
        }

    def cache_key(self, label: str) -> str:
        return stable_hash({"grader": self._identity(), "label": label})

    def grade_labels(self, labels: Sequence[str]) -> list[ConcretenessScore]:
        return asyncio.run(self.agrade_labels(labels))

    async def agrade_labels(self, labels: Sequence[str]) -> list[ConcretenessScore]:
        """Scores aligned with ``labels``; identical labels share one rating. Raises ``JudgeAuthError`` when the
        API refuses the key (HTTP 401/403), after cancelling the batches in flight."""
        self.stats.labels += len(labels)
        done: dict[str, ConcretenessScore] = {}
        todo: list[str] = []
        for label in dict.fromkeys(labels):
            hit = self.cache.get(self.cache_key(label)) if self.cache is not None else None
            if hit is not None:
                self.stats.cache_hits += 1
                done[label] = ConcretenessScore(**{**hit, "cached": True})
            else:
                self.stats.cache_misses += 1
                todo.append(label)
        if todo:
            batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
            bar = _progress(len(batches), f"concreteness {self.grader_id}", self.show_progress)
            sem = asyncio.Semaphore(self.concurrency)
            session = self.chat.open_session(concurrency=self.concurrency, limiter=self.limiter)
            try:

                async def run(batch: list[str]) -> None:
                    async with sem:
                        for score in await self._grade_batch(session, batch):
                            done[score.label] = score
                    bar.update(1)

                tasks = [asyncio.ensure_future(run(b)) for b in batches]
                try:
                    await asyncio.gather(*tasks)
                finally:  # a failure (credentials refused, a full cache disk) cancels the batches still in flight
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                bar.close()
                await session.aclose()
        return [done[label] for label in labels]

    async def _grade_batch(self, session, batch: list[str]) -> list[ConcretenessScore]:
        system, user = concreteness_messages(batch)
        messages = [{"role": "user", "content": user}]
        temperature = self.chat.settings.temperature
        problem = ""
        tally = CallTally()
        for parse_try in range(self.max_parse_retries + 1):
            try:
                reply = await self.chat.complete(
                    session, system, messages, stats=self.stats, tally=tally, temperature=temperature
                )
            except TransportError as exc:
                problem = str(exc)
                break
            try:
                ratings = parse_concreteness(reply, batch)
            except MalformedJudgeOutput as exc:
                problem = f"malformed reply: {exc}"
                if parse_try < self.max_parse_retries:
                    self.stats.parse_retries += 1
                    # a corrective turn: at temperature 0 the same request would repeat the same reply
                    messages = [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": scrub(reply, session.key) or "(empty reply)"},
                        {"role": "user", "content": concreteness_reask(str(exc))},
                    ]
                    if temperature is not None and self.reask_temperature is not None:
                        temperature = max(temperature, self.reask_temperature)
                continue
            out = []
            for r in ratings:
                score = ConcretenessScore(
                    label=r.label,
                    score=r.rating,
                    grader_id=self.grader_id,
                    template_version=self.template_version,
                    reason=r.reason,
                )
                if self.cache is not None:
                    self.cache.put(
                        self.cache_key(r.label),
                        dataclasses.asdict(score),
                        inputs={"grader": self._identity(), "label": r.label},
                    )
                out.append(score)
            return out
        return self._failed(batch, scrub(problem, session.key) or "unknown failure")

    def _failed(self, batch: list[str], problem: str) -> list[ConcretenessScore]:
        self.stats.failed_batches += 1
        closed = self.fail_mode == "closed"
        if closed:
            self.stats.failed_closed += len(batch)
        else:
            self.stats.errors += len(batch)
        return [
            ConcretenessScore(
                label=label,
                score=0.0 if closed else None,
                grader_id=self.grader_id,
                template_version=self.template_version,
                error=problem,
                failed_closed=closed,
            )
            for label in batch
        ]

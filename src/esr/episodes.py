"""Self-correction episodes (exp6/exp9) and their region boundaries, in characters and in tokens.

An *episode* is a steered trial the judge split into exactly two attempts with the second scoring higher. Three
boundaries split its response: off-topic start <= correction start <= on-topic start. They come either from the
judge's character offsets (the authors' Sonnet annotator) or from aligning a restart phrase ("wait, that's not
right", "let me start over", ...): correction start = phrase start, on-topic start = first non-space character after
the phrase, off-topic start = response start.

Character offsets are response-relative. They become token indices through per-token character spans (a
tokenizer's ``offset_mapping``), counted from the first *response* token: header, "\\n\\n" trim and special tokens
(zero-width spans) never shift the boundaries. The authors' exp9 code (paper Sec. 3.6, App. A.4) instead
accumulated decoded token lengths from ``<|end_header_id|>``, so its offsets were shifted by the header and the
trimmed "\\n\\n".

Regions per response token: ``pre`` [0, off), ``off_topic`` [off, corr), ``correction`` [corr, on), ``on_topic``
[on, n). The end-of-turn token is not a response token, so unlike the authors' code it is not in ``on_topic``.
Baseline episodes label every response token ``baseline``; they come from unsteered answers (our default) or, as
the authors did, from steered answers that stayed on topic in a single attempt (``source`` records which).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PRE, OFF_TOPIC, CORRECTION, ON_TOPIC, BASELINE = "pre", "off_topic", "correction", "on_topic", "baseline"
EPISODE_REGIONS = (PRE, OFF_TOPIC, CORRECTION, ON_TOPIC)
BASELINE_SOURCES = ("unsteered", "steered_on_topic")

_TRAILING = re.compile(r"[\s.!,:;\u2014\u2013-]*")


@dataclass(frozen=True)
class CharBoundaries:
    """Response-relative character offsets: off_topic <= correction <= on_topic < len(response)."""

    off_topic: int
    correction: int
    on_topic: int


@dataclass(frozen=True)
class TokenBoundaries:
    """Response-relative token indices (0 = first response token) and the number of response tokens."""

    off_topic: int
    correction: int
    on_topic: int
    n_tokens: int

    def region_labels(self) -> list[str]:
        """One of pre/off_topic/correction/on_topic per response token."""
        labels = [PRE] * self.n_tokens
        for start, stop, name in (
            (self.off_topic, self.correction, OFF_TOPIC),
            (self.correction, self.on_topic, CORRECTION),
            (self.on_topic, self.n_tokens, ON_TOPIC),
        ):
            labels[start:stop] = [name] * max(0, stop - start)
        return labels

    def region_sizes(self) -> dict[str, int]:
        return {
            PRE: self.off_topic,
            OFF_TOPIC: self.correction - self.off_topic,
            CORRECTION: self.on_topic - self.correction,
            ON_TOPIC: self.n_tokens - self.on_topic,
        }


@dataclass
class Episode:
    """One self-correction or baseline episode.

    ``method``: "judge_offsets" or "restart_phrase" for self-correction; "" for baseline.
    ``source``: for baseline episodes, "unsteered" (default) or "steered_on_topic" (the authors')."""

    episode_id: str
    trial_id: str
    kind: str  # "self_correction" | "baseline"
    response: str
    method: str = ""
    source: str = ""
    first_score: float | None = None
    last_score: float | None = None
    chars: CharBoundaries | None = None
    tokens: TokenBoundaries | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def region_labels(self, n_tokens: int | None = None) -> list[str]:
        """Per-token region labels (baseline episodes: all 'baseline', needing ``n_tokens``)."""
        if self.kind == "baseline":
            n = n_tokens if n_tokens is not None else (self.tokens.n_tokens if self.tokens else None)
            if n is None:
                raise ValueError(f"episode {self.episode_id}: baseline labels need n_tokens")
            return [BASELINE] * n
        if self.tokens is None:
            raise ValueError(f"episode {self.episode_id}: no token boundaries mapped yet")
        return self.tokens.region_labels()


# ---------------------------------------------------------------------------------------------------------------
# Selecting trials


def _field(trial: Any, name: str, default: Any = None) -> Any:
    if isinstance(trial, Mapping):
        return trial.get(name, default)
    return getattr(trial, name, default)


def attempt_scores(trial: Any) -> list[float]:
    """Scored attempts of a trials-table row (its ``attempt_scores``) or of an object with a ``scores`` list (e.g. an
    ``esr.judge.JudgeResult``)."""
    if isinstance(trial, Mapping):
        scores = trial.get("attempt_scores")
        if scores is None:
            return []
        return [float(s) for s in scores if s is not None and not (isinstance(s, float) and np.isnan(s))]
    return [float(s) for s in trial.scores]


def is_self_correction(trial: Any) -> bool:
    """Exactly two scored attempts and the last scores higher than the first."""
    s = attempt_scores(trial)
    return len(s) == 2 and s[1] > s[0]


def _usable(trial: Any, exclude_ablation: bool) -> bool:
    if _field(trial, "error"):
        return False
    if not _field(trial, "response"):
        return False
    return not (exclude_ablation and _field(trial, "ablation_set"))


def _steered(trial: Any) -> bool:
    return _field(trial, "latent") is not None and float(_field(trial, "boost", 0.0) or 0.0) != 0.0


def select_self_correction(trials: Iterable[Any], exclude_ablation: bool = True) -> list[Any]:
    """Steered, error-free trials with exactly two attempts and last > first. Ablation-run trials are excluded by
    default (the authors' exp9 episode pool included them)."""
    return [t for t in trials if _usable(t, exclude_ablation) and _steered(t) and is_self_correction(t)]


def select_baseline(
    trials: Iterable[Any],
    source: str = "unsteered",
    n: int | None = 50,
    seed: int = 42,
    min_score: float = 50.0,
    exclude_ablation: bool = True,
) -> list[Any]:
    """Baseline trials, sampled without replacement (seeded numpy generator) down to ``n``.

    ``unsteered`` (default): trials with no steering (latent None or boost 0).
    ``steered_on_topic`` (the authors'): steered trials with exactly one attempt scoring >= ``min_score``."""
    if source not in BASELINE_SOURCES:
        raise ValueError(f"baseline source must be one of {BASELINE_SOURCES}, not {source!r}")
    pool = [t for t in trials if _usable(t, exclude_ablation)]
    if source == "unsteered":
        pool = [t for t in pool if not _steered(t)]
    else:
        pool = [t for t in pool if _steered(t) and len(attempt_scores(t)) == 1 and attempt_scores(t)[0] >= min_score]
    if n is None or len(pool) <= n:
        return pool
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))
    return [pool[i] for i in idx]


# ---------------------------------------------------------------------------------------------------------------
# Character boundaries


def validate_char_offsets(off_topic: int, correction: int, on_topic: int, n_chars: int) -> CharBoundaries | None:
    """The authors' validity rule: non-negative (-1 means 'unclear'), ordered, and on_topic < len(response)."""
    vals = (int(off_topic), int(correction), int(on_topic))
    if min(vals) < 0 or not (vals[0] <= vals[1] <= vals[2]) or vals[2] >= n_chars:
        return None
    return CharBoundaries(*vals)


def parse_judge_offsets(obj: Mapping[str, Any], response: str) -> CharBoundaries | None:
    """Boundaries from the annotator's JSON (``off_topic_char_start``, ``correction_char_start``,
    ``on_topic_char_start``); None if a key is missing, not an integer, or the offsets are invalid."""
    try:
        vals = [obj[k] for k in ("off_topic_char_start", "correction_char_start", "on_topic_char_start")]
        if any(isinstance(v, bool) or int(v) != v for v in vals):
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return validate_char_offsets(*(int(v) for v in vals), n_chars=len(response))


def find_restart(response: str, detector: Any = None) -> CharBoundaries | None:
    """Boundaries by restart-phrase alignment: the first restart (``esr.judge.segmentation.find_restarts``, the
    offline judge's detector unless ``detector`` is given) preceded by non-space text. Correction start = restart
    start; on-topic start = first character after the restart and its trailing punctuation/space; off-topic start =
    0. None if no restart is found or nothing follows it."""
    from esr.judge.segmentation import find_restarts

    for b in find_restarts(response, detector):
        if not response[: b.start].strip():
            continue
        end = _TRAILING.match(response, b.end).end()
        return validate_char_offsets(0, b.start, end, len(response))
    return None


# ---------------------------------------------------------------------------------------------------------------
# Characters -> tokens


def response_token_spans(
    spans: Sequence[tuple[int, int]], response_start: int, response_end: int | None = None
) -> tuple[int, int, list[tuple[int, int]]]:
    """From per-token character spans over the whole rendered conversation, find the response tokens.

    Response tokens are the contiguous run of non-empty spans overlapping [response_start, response_end): zero-width
    (special) tokens and the header/"\\n\\n" trim before ``response_start`` are excluded. Returns (first, stop)
    sequence indices and the spans made response-relative (clipped to the response)."""
    end = float("inf") if response_end is None else response_end
    inside = [i for i, (s, e) in enumerate(spans) if e > s and e > response_start and s < end]
    if not inside:
        raise ValueError(f"no token overlaps the response (chars {response_start}..{response_end})")
    first, stop = inside[0], inside[-1] + 1
    inside_set = set(inside)
    gaps = [i for i in range(first, stop) if i not in inside_set]
    if gaps:
        raise ValueError(f"response tokens are not contiguous: tokens {gaps[:5]} inside the response are empty")
    rel = [(max(s, response_start) - response_start, min(e, end) - response_start) for s, e in spans[first:stop]]
    return first, stop, rel


def char_to_token(spans: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token containing ``char`` (or, if ``char`` falls in a gap, the next token); len(spans) if past
    the end. Zero-width spans never match. Spans must be sorted."""
    for i, (s, e) in enumerate(spans):
        if e > s and e > char:
            return i
    return len(spans)


def map_boundaries(chars: CharBoundaries, spans: Sequence[tuple[int, int]]) -> TokenBoundaries:
    """Map response-relative character boundaries to response-relative token boundaries."""
    n = len(spans)
    return TokenBoundaries(
        char_to_token(spans, chars.off_topic),
        char_to_token(spans, chars.correction),
        char_to_token(spans, chars.on_topic),
        n,
    )


# ---------------------------------------------------------------------------------------------------------------
# Building episodes


def make_episode(
    trial: Any,
    episode_id: str,
    *,
    method: str,
    judge_offsets: Mapping[str, Any] | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    detector: Any = None,
) -> Episode | None:
    """A self-correction episode from a trial; None when no valid boundaries are found.

    ``method="judge_offsets"`` needs ``judge_offsets``; ``"restart_phrase"`` aligns the first restart
    found by ``detector`` (default: the offline judge's, so the boundary is where the judge split the attempts). With response-
    relative token ``spans`` the token boundaries are mapped too. Regions may come out empty in tokens; the
    analysis leaves such episodes out of the paired tests for that pair of regions and reports n."""
    response = _field(trial, "response") or ""
    if method == "judge_offsets":
        if judge_offsets is None:
            raise ValueError("method 'judge_offsets' needs judge_offsets")
        chars = parse_judge_offsets(judge_offsets, response)
    elif method == "restart_phrase":
        chars = find_restart(response, detector)
    else:
        raise ValueError(f"unknown boundary method {method!r} (judge_offsets | restart_phrase)")
    if chars is None:
        return None
    scores = attempt_scores(trial)
    ep = Episode(
        episode_id,
        str(_field(trial, "trial_id")),
        "self_correction",
        response,
        method=method,
        first_score=scores[0] if scores else None,
        last_score=scores[-1] if scores else None,
        chars=chars,
    )
    if spans is not None:
        ep.tokens = map_boundaries(chars, spans)
    return ep

"""Strict, robust parsing of judge replies.

A judge reply must contain a verdict ``{"attempts": [{"attempt_text": str, "score": number}, ...]}``, which the prompt
asks to be wrapped in ``<json>...</json>``. Extraction does not trust the text around the verdict: reasoning may
mention the tag names, contain braces, code fences or a draft verdict. Every position where a JSON object starts is
decoded (``json.JSONDecoder.raw_decode``) and each decoded object is validated against the verdict schema; among the
valid verdicts, those right after a ``<json>`` tag are preferred over untagged ones, and within that tier the
``block`` rule picks the ``last`` (default: the verdict follows the reasoning) or the ``first``. The authors' code
took the text between the first ``<json>`` and the first ``</json>`` (fallback: first ``{`` to last ``}``), so a
reply that mentions the tag before its verdict failed there (reference-protocol.md, section 4).

Unlike the authors' code, a reply whose verdict lacks the key, has empty attempt texts or out-of-range scores is an
error (``MalformedJudgeOutput``), which the caller re-asks and finally records with the raw text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from esr.judge.base import Attempt

BLOCK_CHOICES = ("last", "first")
_DECODER = json.JSONDecoder()
_OPEN_TAG = re.compile(r"<json>\s*(?:```(?:json)?\s*)?$", re.IGNORECASE)
_TAGGED = re.compile(r"<json>\s*(.*?)\s*</json>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
T = TypeVar("T")


class MalformedJudgeOutput(ValueError):
    """The judge answered, but not in the required format. The message says what was wrong."""


@dataclass(frozen=True)
class _Candidate:
    value: Any
    start: int
    end: int
    tagged: bool


def _candidates(text: str, opener: str) -> list[_Candidate]:
    """Every JSON value starting with ``opener`` ('{' or '[') that decodes, left to right. A decoded value's inside
    is scanned too (a draft or a nested verdict may hide there); ``tagged``: right after a ``<json>`` tag."""
    out = []
    i = text.find(opener)
    while i >= 0:
        try:
            value, end = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            pass
        else:
            tagged = _OPEN_TAG.search(text[max(0, i - 40) : i]) is not None
            out.append(_Candidate(value, i, end, tagged))
        i = text.find(opener, i + 1)
    return out


def _choose(text: str, opener: str, validate: Callable[[Any], T], block: str, what: str) -> T:
    """The value chosen by ``block`` among the candidates that ``validate`` accepts (tagged ones first); raises
    ``MalformedJudgeOutput`` naming the most telling problem when none is valid."""
    if block not in BLOCK_CHOICES:
        raise ValueError(f"judge block choice must be one of {BLOCK_CHOICES}, got {block!r}")
    if not text or not text.strip():
        raise MalformedJudgeOutput("empty reply")
    valid: list[tuple[_Candidate, T]] = []
    problems: list[tuple[_Candidate, str]] = []
    for cand in _candidates(text, opener):
        if any(v.start <= cand.start < v.end for v, _ in valid):
            continue  # inside an accepted verdict
        try:
            valid.append((cand, validate(cand.value)))
        except MalformedJudgeOutput as exc:
            problems.append((cand, str(exc)))
    if valid:
        tier = [v for v in valid if v[0].tagged] or valid
        return (tier[-1] if block == "last" else tier[0])[1]
    if problems:  # the outermost problem of the preferred block says most ("no attempts key" over inner items)
        outer = [p for p in problems if not any(q.start < p[0].start < q.end for q, _ in problems)]
        tier = [p for p in outer if p[0].tagged] or outer
        raise MalformedJudgeOutput((tier[-1] if block == "last" else tier[0])[1])
    tagged = _TAGGED.findall(text)
    if tagged:
        body = _FENCE.sub("", tagged[-1 if block == "last" else 0].strip())
        try:
            json.loads(body)
        except json.JSONDecodeError as exc:
            raise MalformedJudgeOutput(f"invalid JSON in <json> block: {exc.msg} at char {exc.pos}") from None
    raise MalformedJudgeOutput(f"no <json> block and no JSON {what} in reply")


def extract_json_block(text: str, *, block: str = "last") -> Any:
    """Any JSON object in ``text`` (tagged ones preferred; ``block`` picks last or first). Raises
    ``MalformedJudgeOutput``."""

    def is_object(value: Any) -> Any:
        if not isinstance(value, dict):
            raise MalformedJudgeOutput("not a JSON object")
        return value

    return _choose(text, "{", is_object, block, "object")


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedJudgeOutput(f"{where}: score is not a number ({value!r})")
    if math.isnan(value) or not 0 <= value <= 100:
        raise MalformedJudgeOutput(f"{where}: score {value!r} outside 0-100")
    return float(value)


def validate_verdict(obj: Any) -> list[Attempt]:
    """Attempts from a decoded verdict object; raises ``MalformedJudgeOutput`` saying what is wrong."""
    if not isinstance(obj, dict) or "attempts" not in obj:
        raise MalformedJudgeOutput('JSON has no "attempts" key')
    items = obj["attempts"]
    if not isinstance(items, list):
        raise MalformedJudgeOutput('"attempts" is not a list')
    attempts = []
    for i, item in enumerate(items):
        where = f"attempt {i}"
        if not isinstance(item, dict):
            raise MalformedJudgeOutput(f"{where} is not an object")
        attempt_text = item.get("attempt_text")
        if not isinstance(attempt_text, str) or not attempt_text.strip():
            raise MalformedJudgeOutput(f"{where}: attempt_text missing or empty")
        attempts.append(Attempt(text=attempt_text, score=_score(item.get("score"), where)))
    return attempts


def parse_attempts(text: str, *, block: str = "last") -> list[Attempt]:
    """Validated attempts from a judge reply (see the module docstring for how the verdict is found; ``block``:
    ``last`` or ``first`` valid verdict). An explicitly empty list is valid (no attempt at all). Raises
    ``MalformedJudgeOutput`` when no object in the reply is a valid verdict."""
    return _choose(text, "{", validate_verdict, block, "object")


@dataclass(frozen=True)
class LabelRating:
    """One concreteness rating from an LLM reply."""

    label: str
    rating: float
    reason: str = ""


def parse_concreteness(text: str, labels: Sequence[str], *, block: str = "last") -> list[LabelRating]:
    """Ratings for ``labels`` (same order) from a reply holding a JSON list of ``{label, rating}`` objects.

    Prose, code fences and stray brackets around the list are ignored: every JSON array in the reply is decoded and
    the ``last`` (or ``first``) one that rates every label is used. Ratings are matched by label text when possible,
    else by position; ratings must be numbers in 0-100. Raises ``MalformedJudgeOutput``."""

    def validate(items: Any) -> list[LabelRating]:
        if not isinstance(items, list) or len(items) != len(labels):
            got = len(items) if isinstance(items, list) else type(items).__name__
            raise MalformedJudgeOutput(f"expected {len(labels)} ratings, got {got}")
        by_label: dict[str, dict] = {}
        for item in items:
            if not isinstance(item, dict):
                raise MalformedJudgeOutput("rating entry is not an object")
            if isinstance(item.get("label"), str):
                by_label.setdefault(item["label"].strip(), item)
        out = []
        for i, label in enumerate(labels):
            item = by_label.get(label.strip(), items[i])
            rating = _score(item.get("rating"), f"label {i}")
            reason = str(item.get("reason", item.get("justification", "")))
            out.append(LabelRating(label=label, rating=rating, reason=reason))
        return out

    return _choose(text, "[", validate, block, "array")

"""Strict parsing of judge replies.

A judge reply must contain ``<json>{"attempts": [{"attempt_text": str, "score": number}, ...]}</json>``. Unlike the
authors' code, a reply that lacks the key, has empty attempt texts or out-of-range scores is an error
(``MalformedJudgeOutput``), which the caller retries and finally records with the raw text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esr.judge.base import Attempt

_JSON_BLOCK = re.compile(r"<json>\s*(.*?)\s*</json>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


class MalformedJudgeOutput(ValueError):
    """The judge answered, but not in the required format. The message says what was wrong."""


def extract_json_block(text: str) -> Any:
    """The JSON value inside the last complete ``<json>...</json>`` block (the verdict comes after the
    reasoning); if there are no tags, the outermost ``{...}`` span. Raises ``MalformedJudgeOutput``."""
    if not text or not text.strip():
        raise MalformedJudgeOutput("empty reply")
    blocks = _JSON_BLOCK.findall(text)
    if blocks:
        candidate = _FENCE.sub("", blocks[-1].strip())
    else:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise MalformedJudgeOutput("no <json> block and no JSON object in reply")
        candidate = text[start : end + 1]
    try:
        return json.loads(candidate)
    except json.JSONDecodeError as exc:
        raise MalformedJudgeOutput(f"invalid JSON: {exc.msg} at char {exc.pos}") from None


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedJudgeOutput(f"{where}: score is not a number ({value!r})")
    if math.isnan(value) or not 0 <= value <= 100:
        raise MalformedJudgeOutput(f"{where}: score {value!r} outside 0-100")
    return float(value)


def parse_attempts(text: str) -> list[Attempt]:
    """Validated attempts from a judge reply. An explicitly empty list is valid (no attempt at all)."""
    obj = extract_json_block(text)
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


@dataclass(frozen=True)
class LabelRating:
    """One concreteness rating from an LLM reply."""

    label: str
    rating: float
    reason: str = ""


def parse_concreteness(text: str, labels: Sequence[str]) -> list[LabelRating]:
    """Ratings for ``labels`` (same order) from a reply holding a JSON list of ``{label, rating}`` objects.

    Accepts code fences and a leading ``json`` word. Ratings are matched by label text when possible, else by
    position; the reply must rate every label, with numbers in 0-100."""
    body = text.strip()
    body = re.sub(r"^```(?:json)?", "", body, flags=re.IGNORECASE).strip()
    body = re.sub(r"```$", "", body).strip()
    if body.lower().startswith("json"):
        body = body[4:].strip()
    start, end = body.find("["), body.rfind("]")
    if start < 0 or end <= start:
        raise MalformedJudgeOutput("no JSON array in concreteness reply")
    try:
        items = json.loads(body[start : end + 1])
    except json.JSONDecodeError as exc:
        raise MalformedJudgeOutput(f"invalid JSON: {exc.msg}") from None
    if not isinstance(items, list) or len(items) != len(labels):
        raise MalformedJudgeOutput(
            f"expected {len(labels)} ratings, got {len(items) if isinstance(items, list) else type(items).__name__}"
        )
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

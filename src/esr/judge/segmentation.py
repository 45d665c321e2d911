"""Restart language: finding it, splitting an answer into attempts at it, and the optional restart-phrase gate.

A *restart phrase* is explicit self-correction such as "Wait, that's not right" or "Let me start over". Phrases that
follow each other with only punctuation between them ("Wait, that's not right. Let me start over.") form one
boundary. The restart words belong to the attempt they open."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from esr.judge.base import Attempt

_APOS = "['\u2019]"
RESTART_PATTERNS: tuple[str, ...] = (
    rf"wait[,!.]?\s*(?:that{_APOS}s|that\s+is)\s+not\s+(?:right|correct)",
    r"let\s+me\s+start\s+over",
    rf"let{_APOS}s\s+start\s+over",
    r"sorry[,!.]?\s*i\s+got\s+off\s+track",
    r"let\s+me\s+try\s+(?:that\s+)?again",
    rf"i{_APOS}ll\s+try\s+again",
    r"actually[,!.]?\s*i\s+made\s+a\s+mistake",
    rf"i{_APOS}d\s+like\s+to\s+revise\s+my\s+answer",
)
RESTART_RE = re.compile("|".join(f"(?:{p})" for p in RESTART_PATTERNS), re.IGNORECASE)
_JOIN_GAP = re.compile(r"^[\s.,;:!?\-\u2014\u2026\"')(]*$")
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?", re.UNICODE)


@dataclass(frozen=True)
class Boundary:
    """Character span of one restart (one or more adjacent restart phrases, with trailing punctuation)."""

    start: int
    end: int


def find_restarts(text: str) -> list[Boundary]:
    """Restart spans in ``text``, adjacent phrases merged into one boundary."""
    spans: list[list[int]] = []
    for m in RESTART_RE.finditer(text):
        if spans and _JOIN_GAP.match(text[spans[-1][1] : m.start()]):
            spans[-1][1] = m.end()
        else:
            spans.append([m.start(), m.end()])
    out = []
    for start, end in spans:
        while end < len(text) and text[end] in ".,;:!?\u2026":
            end += 1
        out.append(Boundary(start, end))
    return out


def has_restart(text: str) -> bool:
    return RESTART_RE.search(text) is not None


def n_words(text: str) -> int:
    return len(_WORD.findall(text))


def strip_restarts(text: str) -> str:
    """``text`` with restart phrases removed (what the offline judge scores)."""
    return re.sub(r"\s+", " ", RESTART_RE.sub(" ", text)).strip(" .,;:!?")


def split_attempts(text: str, min_words: int = 3) -> list[str]:
    """Split an answer into attempts at restart boundaries only.

    Each attempt after the first starts with its restart words. A piece with fewer than ``min_words`` words of its
    own (restart words not counted) is merged into its neighbour: a leading one into the next attempt, any other
    into the previous one. Text without restart language is one attempt; an empty text gives none."""
    if not text.strip():
        return []
    cuts = [b.start for b in find_restarts(text)]
    pieces = [text[a:b].strip() for a, b in zip([0] + cuts, cuts + [len(text)])]
    pieces = [p for p in pieces if p]
    merged: list[str] = []
    carry = ""
    for piece in pieces:
        piece = f"{carry} {piece}".strip() if carry else piece
        carry = ""
        if n_words(strip_restarts(piece)) >= min_words:
            merged.append(piece)
        elif merged:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            carry = piece
    if carry:
        merged.append(carry)
    return merged


# ---------------------------------------------------------------------------------------------- restart gate
def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _boundary_has_restart(response: str, prev: Attempt, cur: Attempt, window: int = 160) -> bool:
    """Whether the boundary between two judge attempts coincides with restart language in ``response``."""
    if not has_restart(response):
        return False
    if has_restart(cur.text[:window]) or has_restart(prev.text[-window:]):
        return True
    head = _norm(cur.text)[:60]
    norm_response = _norm(response)
    pos = norm_response.find(head) if head else -1
    if pos < 0:
        return False
    before = norm_response[max(0, pos - window) : pos + len(head) // 2]
    return has_restart(before)


def restart_gate(response: str, attempts: Sequence[Attempt]) -> tuple[list[Attempt], int]:
    """Keep a judge's attempt boundary only where restart language occurs in the response; merge the attempts on
    either side of any other boundary. An attempt made only of restart words joins the attempt after it. A merged
    attempt's score is the mean of its parts weighted by their word counts, restart words excluded (None if any
    part has none). Returns (attempts, number of merges)."""
    if len(attempts) <= 1:
        return list(attempts), 0
    groups: list[list[Attempt]] = [[attempts[0]]]
    merges = 0
    for prev, cur in zip(attempts, attempts[1:]):
        only_restart = n_words(strip_restarts(groups[-1][-1].text)) == 0
        if _boundary_has_restart(response, prev, cur) and not only_restart:
            groups.append([cur])
        else:  # no restart language here, or the previous "attempt" is nothing but restart words
            groups[-1].append(cur)
            merges += 1
    return [_merge(g) for g in groups], merges


def _merge(group: list[Attempt]) -> Attempt:
    if len(group) == 1:
        return group[0]
    text = " ".join(a.text.strip() for a in group)
    if any(a.score is None for a in group):
        return Attempt(text=text, score=None)
    weights = [n_words(strip_restarts(a.text)) for a in group]  # restart words alone carry no weight
    if not any(weights):
        weights = [1] * len(group)
    score = sum(w * a.score for w, a in zip(weights, group)) / sum(weights)
    return Attempt(text=text, score=round(score, 4))

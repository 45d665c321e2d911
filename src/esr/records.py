"""Record types shared by generation, judging, statistics and reports.

A *trial* is one steered (or unsteered) answer to one prompt; the per-trial tables
(``results/<experiment>/<model>/trials.parquet``) hold one row per trial with the fields of ``Trial``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Attempt:
    """One attempt inside an answer, as split by the judge, with its 0-100 score (None if the judge gave none)."""

    text: str
    score: float | None


@dataclass(frozen=True)
class Intervention:
    """What is done to one batch row during generation.

    ``steer_latent``/``boost``: add ``boost * W_dec[steer_latent]`` at the injection layer (boost in the unit the
    model config names: raw SAE activation units, or multiples of the median residual norm, converted before use).
    ``ablate``: latents whose reconstruction contribution ``f_j(h) * W_dec[j]`` is removed (SAE error kept).
    ``capture``: latents whose SAE activations are recorded per token at the SAE layer."""

    steer_latent: int | None = None
    boost: float = 0.0
    ablate: tuple[int, ...] = ()
    capture: tuple[int, ...] = ()


@dataclass
class Trial:
    trial_id: str
    experiment: str
    model: str
    latent: int | None
    label: str
    boost: float
    prompt_id: int
    prompt: str
    seed: int
    ablation_set: str | None = None
    prompt_variant: str | None = None
    response: str = ""
    n_tokens: int = 0
    judge_id: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error: str | None = None

    @property
    def scores(self) -> list[float]:
        return [a.score for a in self.attempts if a.score is not None]

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["attempt_texts"] = [a.text for a in self.attempts]
        row["attempt_scores"] = [a.score for a in self.attempts]
        del row["attempts"]
        scores = self.scores
        row["n_attempts"] = len(scores)
        row["first_score"] = scores[0] if scores else None
        row["last_score"] = scores[-1] if scores else None
        return row

"""The trials table: one row per trial, the one record that flows from the plan to the audit.

A *trial* is one answer of one model to one prompt under one intervention (steered at a boost, with an ablation set,
with a meta-prompt, or unsteered). ``results/<experiment>/<model>/trials.parquet`` holds one row per trial. The row
is built in three stages, each adding columns, and the table is validated against this schema whenever a stage
writes it or reads it (:func:`write_trials`, :func:`read_trials`):

* ``planned`` (``TrialSpec``, from ``esr.experiments``): ids, latent, label, boost, prompt, seed, ablation set,
  prompt variant, boost level;
* ``generated`` (``esr.stages.experiments.generate``): the answer text and tokens, how it ended, the steering
  coefficient actually added, the generation settings and provenance;
* ``graded`` (``esr.stages.experiments.grade``): the judge's attempts and their 0-100 scores, and the score columns
  derived from them by :func:`score_columns` (the only place they are computed).

Score columns (paper Sec. 2.3; metrics in ``esr.metrics``): ``n_attempts`` counts the *scored* attempts (an attempt
the judge gave no score does not count), ``first_score`` / ``last_score`` are the first and last scored attempt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pandas (~0.5 s) loads where a table is made or read: the Snakefile parse plans without it
    import pandas as pd

from esr.io import write_parquet
from esr.judge.base import JudgeRequest

Stage = Literal["planned", "generated", "graded"]


class TrialsTableError(ValueError):
    """A trials table lacks columns of its stage, or a column holds values of the wrong kind."""


@dataclass(frozen=True)
class TrialSpec:
    """One planned trial: the ``planned`` columns of the trials table.

    ``prompt`` is what the model sees; ``judge_prompt`` what the judge is asked about (they differ for exp5's
    meta-prompts). ``boost`` is in the SAE's boost unit (``models.<m>.sae.boost_unit``: raw SAE activation units, or
    multiples of the median residual norm at the SAE layer); 0 with ``steer=False``. ``ablate`` lists the latents
    whose SAE reconstruction is removed (exp3, exp10)."""

    trial_id: str
    experiment: str
    condition: str
    model: str
    latent: int | None
    label: str
    boost: float
    prompt_id: int
    prompt: str
    judge_prompt: str
    seed: int
    threshold: float | None = None
    ablation_set: str | None = None
    ablate: tuple[int, ...] = ()
    prompt_variant: str | None = None
    boost_level: str | None = None
    steer: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ablate"] = list(self.ablate)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["ablate"] = tuple(int(a) for a in (d.get("ablate") if d.get("ablate") is not None else ()))
        return cls(**d)


@dataclass(frozen=True)
class Column:
    """One column of the trials table: its stage, the kind of its values, and what it means."""

    name: str
    stage: Stage
    kind: Literal["str", "int", "float", "bool", "list", "json"]
    nullable: bool
    doc: str


_SPEC_DOCS = {
    "trial_id": "experiment|condition|model|L<latent>|P<prompt>|S<seed>[|level]: unique within a table",
    "experiment": "exp1, exp2, ... (esr.experiments.REGISTRY)",
    "condition": "the experiment's condition wildcard",
    "model": "model name (config key)",
    "latent": "steered SAE latent (None: no latent)",
    "label": "the latent's label",
    "boost": "boost added, in the SAE's boost unit",
    "prompt_id": "index into the prompt list",
    "prompt": "what the model sees",
    "judge_prompt": "what the judge grades against",
    "seed": "the trial's sampling seed",
    "threshold": "the latent's calibrated boost threshold",
    "ablation_set": "name of the ablated latent set",
    "ablate": "ablated latents",
    "prompt_variant": "exp5 meta-prompt variant",
    "boost_level": "exp2 sweep level",
    "steer": "whether the steering vector is added",
}
_SPEC_KINDS = {
    "trial_id": "str",
    "experiment": "str",
    "condition": "str",
    "model": "str",
    "latent": "int",
    "label": "str",
    "boost": "float",
    "prompt_id": "int",
    "prompt": "str",
    "judge_prompt": "str",
    "seed": "int",
    "threshold": "float",
    "ablation_set": "str",
    "ablate": "list",
    "prompt_variant": "str",
    "boost_level": "str",
    "steer": "bool",
}
_SPEC_NULLABLE = {"latent", "threshold", "ablation_set", "prompt_variant", "boost_level"}

COLUMNS: tuple[Column, ...] = tuple(
    [
        Column(f.name, "planned", _SPEC_KINDS[f.name], f.name in _SPEC_NULLABLE, _SPEC_DOCS[f.name])
        for f in fields(TrialSpec)
    ]
    + [
        Column(*c)
        for c in (
            ("response", "generated", "str", False, "the generated answer (decoded new tokens)"),
            ("n_tokens", "generated", "int", False, "number of generated tokens"),
            ("finish_reason", "generated", "str", False, "eos | length"),
            ("token_ids", "generated", "list", False, "generated token ids"),
            ("boost_unit", "generated", "str", True, "raw | median_resid_norm"),
            ("steer_coefficient", "generated", "float", True, "coefficient on the unit decoder direction"),
            ("steer_residual_norm", "generated", "float", True, "the model's median residual norm used for the unit"),
            ("settings", "generated", "json", False, "generation settings (temperature, penalty, engine, ...)"),
            ("provenance", "generated", "json", False, "provenance of the generation job"),
            ("judge_id", "graded", "str", True, "backend:model of the judge"),
            ("judge_template_version", "graded", "str", True, "version of the judge's prompt template"),
            ("attempt_texts", "graded", "list", True, "the answer split into attempts"),
            ("attempt_scores", "graded", "list", True, "0-100 score per attempt (None: no score)"),
            ("n_attempts", "graded", "int", False, "number of scored attempts (score_columns)"),
            ("first_score", "graded", "float", True, "first scored attempt (score_columns)"),
            ("last_score", "graded", "float", True, "last scored attempt (score_columns)"),
            ("error", "graded", "str", True, "judge error message (None: graded)"),
            ("error_kind", "graded", "str", True, "http | parse | ... (None: graded)"),
            ("judge_raw", "graded", "str", True, "the judge's raw reply"),
            ("judge_metadata", "graded", "json", True, "judge metadata (JSON)"),
        )
    ]
)

_ORDER: tuple[Stage, ...] = ("planned", "generated", "graded")


def columns(stage: Stage) -> list[str]:
    """The column names a table of ``stage`` has (every earlier stage's columns included)."""
    upto = _ORDER[: _ORDER.index(stage) + 1]
    return [c.name for c in COLUMNS if c.stage in upto]


def empty_frame(stage: Stage) -> pd.DataFrame:
    """A zero-row table with the columns of ``stage`` (an experiment condition that runs no trials)."""
    import pandas as pd

    return pd.DataFrame(columns=columns(stage))


def score_columns(attempt_scores: Iterable[Sequence[float | None] | None]) -> pd.DataFrame:
    """``n_attempts``, ``first_score``, ``last_score`` from each trial's attempt scores (None scores skipped):
    the one place these derived columns are computed."""
    import pandas as pd

    scored = [[float(s) for s in (x if x is not None else []) if s is not None and s == s] for x in attempt_scores]
    return pd.DataFrame(
        {
            "n_attempts": [len(s) for s in scored],
            "first_score": [s[0] if s else None for s in scored],
            "last_score": [s[-1] if s else None for s in scored],
        },
        dtype=object,
    ).astype({"n_attempts": int, "first_score": float, "last_score": float})


def with_grades(trials: pd.DataFrame, results: Sequence[Any]) -> pd.DataFrame:
    """``trials`` with the ``graded`` columns filled from one ``esr.judge.JudgeResult`` per row."""
    if len(results) != len(trials):
        raise TrialsTableError(f"{len(results)} judge results for {len(trials)} trials")
    scores = [[a.score for a in g.attempts] for g in results]
    derived = score_columns(scores)
    return trials.assign(
        judge_id=[g.judge_id for g in results],
        judge_template_version=[g.template_version for g in results],
        attempt_texts=[[a.text for a in g.attempts] for g in results],
        attempt_scores=scores,
        n_attempts=derived["n_attempts"].to_numpy(),
        first_score=derived["first_score"].to_numpy(),
        last_score=derived["last_score"].to_numpy(),
        error=[g.error for g in results],
        error_kind=[g.error_kind for g in results],
        judge_raw=[g.raw_text for g in results],
        judge_metadata=[json.dumps(g.metadata, default=str) for g in results],
    )


def grade_trials(table: pd.DataFrame, judge: Any) -> pd.DataFrame:
    """``table`` graded by ``judge`` (an ``esr.judge.Judge``): each answer against its ``judge_prompt`` and latent
    label, the results as the ``graded`` columns (:func:`with_grades`). The judge caches by content, so a rerun
    after a crash repeats no call."""
    results = judge.grade_batch(
        [JudgeRequest(r.judge_prompt, r.response, r.label or "", r.trial_id) for r in table.itertuples()]
    )
    return with_grades(table, results)


def validate(
    df: pd.DataFrame, stage: Stage, where: str | os.PathLike = "trials table", unique: Sequence[str] = ("trial_id",)
) -> pd.DataFrame:
    """Check that ``df`` has every column of ``stage``, that non-null values have the column's kind, and that the
    ``unique`` columns identify rows (exp7's regrade has one row per trial *and judge*).

    Returns ``df``. Raises ``TrialsTableError`` naming ``where``, the missing columns or the first bad value."""
    missing = [c for c in columns(stage) if c not in df.columns]
    if missing:
        raise TrialsTableError(f"{where}: a {stage} trials table lacks column(s) {', '.join(missing)}")
    if not len(df):
        return df
    by_name = {c.name: c for c in COLUMNS}
    for name in columns(stage):
        col = by_name[name]
        values = df[name]
        null = values.isna() if col.kind not in ("list",) else values.map(lambda v: v is None)
        if null.any() and not col.nullable:
            raise TrialsTableError(f"{where}: column {name!r} is empty in row {int(null.values.argmax())}")
        bad = values[~null].map(lambda v: not _is_kind(v, col.kind))
        if bad.any():
            i = bad.index[bad.values.argmax()]
            raise TrialsTableError(
                f"{where}: column {name!r} holds {values[i]!r} ({type(values[i]).__name__}), expected {col.kind}"
            )
    dup = df.duplicated(list(unique))
    if dup.any():
        raise TrialsTableError(f"{where}: duplicate {'/'.join(unique)} {df.loc[dup, list(unique)].iloc[0].tolist()}")
    return df


def _is_kind(v: Any, kind: str) -> bool:
    if kind in ("str", "json"):
        return isinstance(v, str)
    if kind == "int":
        return (
            isinstance(v, (int, np.integer))
            and not isinstance(v, bool)
            or (isinstance(v, (float, np.floating)) and float(v).is_integer())
        )
    if kind == "float":
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, (bool, np.bool_))
    return isinstance(v, (list, tuple, np.ndarray))


def write_trials(
    path: str | os.PathLike, df: pd.DataFrame, stage: Stage, unique: Sequence[str] = ("trial_id",)
) -> None:
    """Validate ``df`` as a ``stage`` table (see :func:`validate`) and write it atomically as parquet."""
    write_parquet(path, validate(df, stage, path, unique))


def read_trials(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    stage: Stage = "graded",
    unique: Sequence[str] = ("trial_id",),
) -> pd.DataFrame:
    """Read and concatenate trials tables, validating each as a ``stage`` table (empty tables are skipped)."""
    import pandas as pd

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    frames = [validate(pd.read_parquet(p), stage, p, unique) for p in paths]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else empty_frame(stage)

"""Latent selection: labels table IO, filters, seeded candidate draw, prompt and seed assignment, the selection file.

Pipeline (the authors' selection, with fixes where their code departs from the paper or is fragile):

1. **Labels** (:func:`read_labels`): a CSV with a latent column (``latent``, or the authors' ``index_in_sae``)
   and ``label``, plus any other columns. Empty labels, and placeholders ``feature_<idx>`` (what the authors'
   code turned empty labels into before dropping them), are *unlabeled*. Latents of the SAE missing from the
   table are unlabeled too; the universe is the SAE width ``d_sae``, not the number of CSV rows (the authors'
   code drew candidates from ``range(number of rows)``).
2. **Candidate draw**: a permutation of ``range(d_sae)`` from a generator seeded by a stable hash of
   ``(seed, model, "candidates")``. With ``candidate_multiplier = m`` only the first ``m * n_latents``
   candidates are examined (the authors used 3 and no retry, so runs often ended short); with ``null`` the
   permutation is walked block by block until ``n_latents`` survive or it is exhausted.
3. **Filters**, applied in this order and each candidate counted under the *first* filter it fails:
   ``unlabeled`` -> ``dead`` (firing frequency <= ``dead_threshold``) -> ``relevance_fail`` -> concreteness
   (``concreteness_error`` when the grader gave no score for the label, i.e. fail-closed made visible;
   ``concreteness_fail`` when the score < threshold). The cheap filters run first so that the (paid) grader only
   sees labels that could still be selected.
4. **Relevance filter** (:func:`relevance_pass_mask`), two variants on a ``[n_prompts, d_sae]`` matrix of
   activations max-pooled over each prompt's tokens: ``zero_on_prompts`` (the authors' code: keep a latent only
   if it is exactly 0 on every prompt) and ``top100_on_prompt_tokens`` (drop each prompt's top-100 activated
   latents, ranked on the prompt's tokens; only latents with a positive activation can be in a top-k). ``none``
   disables it. The paper's text ranks latents on the *unsteered responses*, which is not built: its old name here,
   ``top100_per_prompt``, is a deprecated alias of ``top100_on_prompt_tokens`` (accepted with a warning).
   ``n_latents`` may be set per model (``selection.n_latents_per_model``, :func:`model_selection_settings`).
5. **Final list**: survivors in candidate order, truncated to ``n_latents``. Each selected latent gets
   ``trials_per_latent`` *distinct* prompts and one sampling seed per trial, drawn from generators seeded by
   ``(seed, model, "prompts:<latent>")`` and ``(seed, model, "trial_seeds:<latent>")``, so a latent's prompts and
   seeds do not depend on which other latents were selected.

The selection file (:func:`write_selection`) is what every later rule reads, so exp1, the ablation, the controls and
the baselines replay the same latents, prompts and seeds."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esr.io import SEED_HIGH, derive_seed, read_json, write_json

if TYPE_CHECKING:
    import pandas as pd

RELEVANCE_FILTERS = ("zero_on_prompts", "top100_on_prompt_tokens", "none")
#: Deprecated names of relevance filters -> the filter they now name.
DEPRECATED_RELEVANCE_FILTERS = {"top100_per_prompt": "top100_on_prompt_tokens"}
FILTER_ORDER = ("unlabeled", "dead", "relevance_fail", "concreteness_error", "concreteness_fail")
_PLACEHOLDER = re.compile(r"^feature_\d+$")

ConcretenessGrader = Callable[[Sequence[str]], Sequence["float | None"]]


class SelectionError(ValueError):
    """A selection setting or input is wrong; the message names the offending key and value."""


# ---------------------------------------------------------------------------------------------------------------
# Seeds


def derive_rng(seed: int, model: str, purpose: str) -> np.random.Generator:
    """A numpy Generator for one purpose of one model, derived from the run seed (no global RNG state)."""
    return np.random.default_rng(derive_seed(seed, model, purpose))


# ---------------------------------------------------------------------------------------------------------------
# Labels


def is_unlabeled(label: Any) -> bool:
    """True for a missing/empty label or a ``feature_<idx>`` placeholder."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return True
    text = str(label).strip()
    return not text or bool(_PLACEHOLDER.match(text))


def read_labels(path: str | Path) -> pd.DataFrame:
    """Read a labels CSV into a frame with ``latent`` (int) and ``label`` (str, or None when unlabeled) first,
    other columns kept. Accepts ``index_in_sae`` for ``latent``. Duplicate or negative latents are errors."""
    import pandas as pd

    path = Path(path)
    df = pd.read_csv(path, dtype={"label": "string"}, keep_default_na=False, na_values=[])
    if "latent" not in df.columns and "index_in_sae" in df.columns:
        df = df.rename(columns={"index_in_sae": "latent"})
    for col in ("latent", "label"):
        if col not in df.columns:
            raise SelectionError(f"labels file {str(path)!r} has no {col!r} column (columns: {list(df.columns)})")
    return normalize_labels(df, source=str(path))


def normalize_labels(df: pd.DataFrame, source: str = "labels") -> pd.DataFrame:
    """Validate and normalise a labels frame (see :func:`read_labels`)."""
    import pandas as pd

    df = df.copy()
    try:
        latents = pd.to_numeric(df["latent"], errors="raise").astype("int64")
    except (ValueError, TypeError) as exc:
        raise SelectionError(f"{source}: column 'latent' must hold integers ({exc})") from None
    if (latents < 0).any():
        raise SelectionError(f"{source}: negative latent index {int(latents[latents < 0].iloc[0])}")
    dup = latents[latents.duplicated()]
    if len(dup):
        raise SelectionError(f"{source}: latent {int(dup.iloc[0])} appears more than once")
    df["latent"] = latents
    df["label"] = pd.Series(
        [None if is_unlabeled(v) else str(v).strip() for v in df["label"].astype(object)], index=df.index, dtype=object
    )
    cols = ["latent", "label"] + [c for c in df.columns if c not in ("latent", "label")]
    return df[cols].reset_index(drop=True)


def labels_dict(labels: pd.DataFrame | Mapping[int, Any]) -> dict[int, str | None]:
    """``{latent: label or None}`` from a labels frame or mapping."""
    if isinstance(labels, Mapping):
        return {int(k): (None if is_unlabeled(v) else str(v).strip()) for k, v in labels.items()}
    df = normalize_labels(labels)
    return dict(zip(df["latent"].tolist(), df["label"].tolist()))


# ---------------------------------------------------------------------------------------------------------------
# Filters


def relevance_pass_mask(prompt_acts: np.ndarray, variant: str, top_k: int = 100) -> np.ndarray:
    """Boolean ``[d_sae]`` mask of latents that *pass* the relevance filter (are unrelated to the prompts).

    ``prompt_acts``: ``[n_prompts, d_sae]`` activations max-pooled over each prompt's tokens.
    ``zero_on_prompts``: pass iff the activation is exactly 0 on every prompt (the authors' code).
    ``top100_on_prompt_tokens``: fail iff among some prompt's ``top_k`` most activated latents with activation > 0
    over the prompt's tokens (ties broken by lower latent index; the paper's text ranks on unsteered responses
    instead). ``top100_per_prompt``: deprecated alias of it (a ``DeprecationWarning``). ``none``: everything
    passes."""
    variant = _relevance_variant(variant)
    acts = np.asarray(prompt_acts)
    if acts.ndim != 2:
        raise SelectionError(f"prompt activations must be [n_prompts, d_sae], got shape {acts.shape}")
    if variant == "none":
        return np.ones(acts.shape[1], dtype=bool)
    if not np.all(np.isfinite(acts)):
        raise SelectionError("prompt activations contain NaN or inf")
    if variant == "zero_on_prompts":
        return ~np.any(acts != 0, axis=0)
    if variant == "top100_on_prompt_tokens":
        if top_k < 1:
            raise SelectionError(f"config key 'selection.relevance_top_k' = {top_k!r} must be >= 1")
        relevant = np.zeros(acts.shape[1], dtype=bool)
        for row in acts:
            order = np.argsort(-row, kind="stable")[:top_k]
            relevant[order[row[order] > 0]] = True
        return ~relevant
    raise SelectionError(
        f"config key 'selection.relevance_filter' = {variant!r} must be one of {', '.join(RELEVANCE_FILTERS)}"
    )


def _relevance_variant(variant: str) -> str:
    """``variant`` with a deprecated name replaced by the filter it names (and a ``DeprecationWarning`` saying so)."""
    if variant in DEPRECATED_RELEVANCE_FILTERS:
        new = DEPRECATED_RELEVANCE_FILTERS[variant]
        warnings.warn(
            f"config key 'selection.relevance_filter' = {variant!r} is deprecated: it ranks latents on the prompt's "
            f"tokens, not on unsteered responses as the paper's text does; use {new!r} (same filter)",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    return variant


def firing_frequency(labels: pd.DataFrame, d_sae: int, column: str = "frequency") -> np.ndarray:
    """A ``[d_sae]`` firing-frequency vector from a labels frame column (the embedded labeller writes
    ``frequency``); latents missing from the table get NaN, which :func:`dead_mask` does not count as dead."""
    if column not in labels.columns:
        raise SelectionError(f"labels table has no {column!r} column (columns: {list(labels.columns)})")
    freq = np.full(d_sae, np.nan)
    idx = labels["latent"].to_numpy(dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= d_sae):
        raise SelectionError(f"labels name latent {int(idx.max())} outside the SAE's {d_sae} latents")
    freq[idx] = labels[column].to_numpy(dtype=float)
    return freq


def dead_mask(firing_freq: np.ndarray | None, d_sae: int, threshold: float = 0.0) -> np.ndarray:
    """Boolean ``[d_sae]`` mask of dead latents (firing frequency <= ``threshold``); all False without a vector."""
    if firing_freq is None:
        return np.zeros(d_sae, dtype=bool)
    freq = np.asarray(firing_freq, dtype=float)
    if freq.shape != (d_sae,):
        raise SelectionError(f"firing frequency vector has shape {freq.shape}, expected ({d_sae},)")
    return freq <= threshold


def grade_concreteness(labels: Sequence[str], grader: ConcretenessGrader) -> dict[str, float | None]:
    """Grade unique label texts once; ``None`` (or NaN) means the grader failed for that label (fail-closed)."""
    unique = list(dict.fromkeys(labels))
    if not unique:
        return {}
    scores = list(grader(unique))
    if len(scores) != len(unique):
        raise SelectionError(f"concreteness grader returned {len(scores)} scores for {len(unique)} labels")
    out: dict[str, float | None] = {}
    for label, score in zip(unique, scores):
        if score is None or (isinstance(score, float) and math.isnan(score)):
            out[label] = None
            continue
        value = float(score)
        if not 0.0 <= value <= 100.0:
            raise SelectionError(f"concreteness grader gave {value!r} for label {label!r}; expected 0-100 or None")
        out[label] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Selection


@dataclass(frozen=True)
class SelectionSettings:
    """The ``selection`` config block."""

    n_latents: int = 1000
    trials_per_latent: int = 5
    concreteness_threshold: float = 65.0
    relevance_filter: str = "zero_on_prompts"
    relevance_top_k: int = 100
    candidate_multiplier: int | None = None
    dead_threshold: float = 0.0
    n_latents_per_model: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SelectionError:
            return SelectionError(f"config key 'selection.{key}' = {getattr(self, key)!r}: {why}")

        for key in ("n_latents", "trials_per_latent", "relevance_top_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "must be a positive integer")
        if not 0.0 <= self.concreteness_threshold <= 100.0:
            raise bad("concreteness_threshold", "must be in [0, 100]")
        if self.relevance_filter in DEPRECATED_RELEVANCE_FILTERS:
            object.__setattr__(self, "relevance_filter", _relevance_variant(self.relevance_filter))
        if self.relevance_filter not in RELEVANCE_FILTERS:
            raise bad("relevance_filter", f"must be one of {', '.join(RELEVANCE_FILTERS)}")
        if self.candidate_multiplier is not None and (
            not isinstance(self.candidate_multiplier, int) or self.candidate_multiplier < 1
        ):
            raise bad("candidate_multiplier", "must be null or a positive integer")
        if self.dead_threshold < 0:
            raise bad("dead_threshold", "must be >= 0")
        for model, value in dict(self.n_latents_per_model or {}).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SelectionError(
                    f"config key 'selection.n_latents_per_model.{model}' = {value!r}: must be a positive integer"
                )


def model_selection_settings(
    block: Mapping[str, Any] | None, model: str, *, base_model: str | None = None
) -> SelectionSettings:
    """The :class:`SelectionSettings` of ``model`` from the ``selection`` config block: ``n_latents`` replaced by
    ``n_latents_per_model[model]`` where that is set, else (a fine-tuned model, exp4: ``base_model``) by its base
    model's ``n_latents_per_model[base_model]`` (the paper ran about 1,000 latents x 5 trials per model, reference
    protocol 2.6). Raises :class:`SelectionError` naming a bad key (``TypeError`` for an unknown one)."""
    settings = SelectionSettings(**dict(block or {}))
    per_model = dict(settings.n_latents_per_model or {})
    default = per_model.get(base_model, settings.n_latents) if base_model else settings.n_latents
    return dataclasses.replace(settings, n_latents=per_model.get(model, default))


@dataclass
class FilterCounts:
    """How many candidates each filter removed (first failing filter only) and how many were selected.

    ``candidates`` = candidates examined; ``passed`` = survivors of every filter (``selected`` <= ``passed``,
    the excess being cut by the ``n_latents`` truncation); ``graded`` = labels sent to the concreteness grader."""

    candidates: int = 0
    unlabeled: int = 0
    dead: int = 0
    relevance_fail: int = 0
    concreteness_error: int = 0
    concreteness_fail: int = 0
    passed: int = 0
    selected: int = 0
    graded: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SelectedLatent:
    """One selected latent with its label, concreteness score and the prompts and seeds of its trials."""

    latent: int
    label: str
    concreteness: float
    prompt_ids: tuple[int, ...]
    trial_seeds: tuple[int, ...]


@dataclass
class Selection:
    """The selection of one model: settings, seeds, filter counts and the selected latents with their trials."""

    model: str
    seed: int
    d_sae: int
    n_prompts: int
    settings: SelectionSettings
    counts: FilterCounts
    latents: list[SelectedLatent]
    rng: dict[str, Any] = field(default_factory=dict)
    rejected: dict[str, list[int]] = field(default_factory=dict)

    @property
    def shortfall(self) -> int:
        """How many fewer latents than requested were selected."""
        return self.settings.n_latents - len(self.latents)

    def trials(self) -> list[dict[str, int]]:
        """One row per trial: latent, trial index, prompt id and sampling seed."""
        return [
            {"latent": s.latent, "trial": t, "prompt_id": p, "seed": sd}
            for s in self.latents
            for t, (p, sd) in enumerate(zip(s.prompt_ids, s.trial_seeds))
        ]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shortfall"] = self.shortfall
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Selection:
        d = dict(d)
        d.pop("shortfall", None)
        d.pop("provenance", None)
        d["settings"] = SelectionSettings(**d["settings"])
        d["counts"] = FilterCounts(**d["counts"])
        d["latents"] = [
            SelectedLatent(
                latent=int(s["latent"]),
                label=s["label"],
                concreteness=float(s["concreteness"]),
                prompt_ids=tuple(int(p) for p in s["prompt_ids"]),
                trial_seeds=tuple(int(x) for x in s["trial_seeds"]),
            )
            for s in d["latents"]
        ]
        return cls(**d)


def assign_trials(
    seed: int, model: str, latent: int, n_prompts: int, k: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``k`` distinct prompt ids out of ``n_prompts`` and ``k`` trial seeds for one latent (seeded per latent)."""
    if k > n_prompts:
        raise SelectionError(
            f"config key 'selection.trials_per_latent' = {k} exceeds the {n_prompts} prompts "
            "(each latent needs distinct prompts)"
        )
    prompts = derive_rng(seed, model, f"prompts:{latent}").choice(n_prompts, size=k, replace=False)
    seeds = derive_rng(seed, model, f"trial_seeds:{latent}").integers(0, SEED_HIGH, size=k)
    return tuple(int(p) for p in prompts), tuple(int(s) for s in seeds)


def select_latents(
    *,
    model: str,
    seed: int,
    settings: SelectionSettings,
    d_sae: int,
    labels: pd.DataFrame | Mapping[int, Any],
    grader: ConcretenessGrader,
    prompt_acts: np.ndarray | None,
    n_prompts: int,
    firing_freq: np.ndarray | None = None,
    progress: bool = False,
) -> Selection:
    """Run the selection pipeline (module docstring) for one model and return the :class:`Selection`.

    ``labels``: frame or ``{latent: label}``; ``grader``: unique label texts -> 0-100 scores (None on failure);
    ``prompt_acts``: ``[n_prompts_used, d_sae]`` max-pooled prompt activations (may be None only with
    ``relevance_filter: none``); ``n_prompts``: size of the prompt list that trials draw from;
    ``firing_freq``: ``[d_sae]`` firing frequencies (dead-latent filter; skipped when None)."""
    from esr.progress import Progress

    if d_sae < 1:
        raise SelectionError(f"d_sae = {d_sae!r} must be >= 1")
    label_of = labels_dict(labels)
    outside = [j for j in label_of if not 0 <= j < d_sae]
    if outside:
        raise SelectionError(f"labels name latent {min(outside)} outside the SAE's {d_sae} latents")
    if prompt_acts is None:
        if settings.relevance_filter != "none":
            raise SelectionError(f"relevance_filter {settings.relevance_filter!r} needs prompt activations")
        relevant_ok = np.ones(d_sae, dtype=bool)
    else:
        if np.asarray(prompt_acts).shape[-1] != d_sae:
            raise SelectionError(
                f"prompt activations have {np.asarray(prompt_acts).shape[-1]} latents, expected d_sae = {d_sae}"
            )
        relevant_ok = relevance_pass_mask(prompt_acts, settings.relevance_filter, settings.relevance_top_k)
    dead = dead_mask(firing_freq, d_sae, settings.dead_threshold)

    rng_candidates_seed = derive_seed(seed, model, "candidates")
    order = np.random.default_rng(rng_candidates_seed).permutation(d_sae)
    n = settings.n_latents
    limit = d_sae if settings.candidate_multiplier is None else min(d_sae, settings.candidate_multiplier * n)
    block = limit if settings.candidate_multiplier is not None else max(3 * n, 64)

    counts = FilterCounts()
    rejected: dict[str, list[int]] = {name: [] for name in FILTER_ORDER}
    survivors: list[tuple[int, str, float]] = []
    meter = Progress(total=n, desc=f"selecting latents ({model})", unit="latents") if progress else None
    pos = 0
    while pos < limit and len(survivors) < n:
        chunk = order[pos : min(pos + block, limit)]
        pos += len(chunk)
        counts.candidates += len(chunk)
        to_grade: list[tuple[int, str]] = []
        for j in (int(x) for x in chunk):
            label = label_of.get(j)
            reason = (
                "unlabeled"
                if label is None
                else "dead"
                if dead[j]
                else "relevance_fail"
                if not relevant_ok[j]
                else None
            )
            if reason:
                rejected[reason].append(j)
            else:
                to_grade.append((j, label))
        scores = grade_concreteness([lab for _, lab in to_grade], grader)
        counts.graded += len(to_grade)
        for j, label in to_grade:
            score = scores[label]
            if score is None:
                rejected["concreteness_error"].append(j)
            elif score < settings.concreteness_threshold:
                rejected["concreteness_fail"].append(j)
            else:
                survivors.append((j, label, score))
        if meter is not None and min(len(survivors), n) > meter.done:  # a line per block that found latents
            meter.update(min(len(survivors), n) - meter.done)
    if meter is not None:
        meter.close()
    for name in FILTER_ORDER:
        setattr(counts, name, len(rejected[name]))
    counts.passed = len(survivors)
    chosen = survivors[:n]
    counts.selected = len(chosen)
    latents = []
    for j, label, score in chosen:
        prompt_ids, trial_seeds = assign_trials(seed, model, j, n_prompts, settings.trials_per_latent)
        latents.append(
            SelectedLatent(latent=j, label=label, concreteness=score, prompt_ids=prompt_ids, trial_seeds=trial_seeds)
        )
    rng_info = {
        "scheme": "numpy default_rng(int(sha256(json([seed, model, purpose]))[:16], 16) % (2**31-1))",
        "candidates_seed": rng_candidates_seed,
        "purposes": ["candidates", "prompts:<latent>", "trial_seeds:<latent>"],
    }
    return Selection(
        model=model,
        seed=int(seed),
        d_sae=int(d_sae),
        n_prompts=int(n_prompts),
        settings=settings,
        counts=counts,
        latents=latents,
        rng=rng_info,
        rejected=rejected,
    )


def write_selection(path: str | Path, selection: Selection, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write the selection file (JSON, atomically) with an optional provenance block."""
    blob = selection.to_dict()
    blob["provenance"] = dict(provenance or {})
    return write_json(path, blob)


def read_selection(path: str | Path) -> Selection:
    """Read a selection file written by :func:`write_selection`."""
    return Selection.from_dict(read_json(path))

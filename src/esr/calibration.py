"""Per-latent boost calibration by probabilistic bisection, with a fully keyed cache and resumable shard jobs.

Goal (as in the authors' code): for each latent find the boost b* at which the judged *first-attempt* score, averaged
over a few sampled prompts, is close to a target (0.3 in the paper). The score falls as the boost rises, so the
search looks for the root of ``mean_score(b) - target`` inside ``[lower, upper]``.

Algorithm: probabilistic bisection (Waeber, Frazier & Henderson 2011) on a discrete grid.

* Grid of ``grid_points`` values in ``[lower, upper]``; prior = a Gaussian (mean, std from the model config's
  ``boost`` block) evaluated on the grid and normalised (kept in log space, so long searches cannot underflow).
* Each step queries the posterior median, observes ``s`` = the mean first-attempt score in [0, 1] over
  ``samples_per_step`` prompts, and reads a direction ``y`` (+1: the root lies above the query, i.e. more boost is
  needed because ``s`` is above target; -1: below) and a confidence ``p`` in (0.5, 1).
* Likelihood update: grid points on the indicated side are multiplied by ``p``, those on the other side by
  ``1 - p``, and the query point itself by a weight set by ``calibration.query_weight``: ``half`` (default, 0.5:
  if the root sat exactly at the query, the direction would be a fair coin) or ``authors_sqrt`` (the authors'
  ``sqrt(p(1-p))``, the geometric mean of the two sides' factors; reference protocol Sec. 3 step 5). Then
  renormalise.
* Result: the posterior median after the last step, rounded to ``calibration.round_decimals`` decimals (default
  null: not rounded; the authors rounded to 2, reference protocol Sec. 3 "Result"), followed by a check of the
  achieved score at the result (``check_samples`` answers; the authors used 1), recorded but not used.

Confidence models (config key ``calibration.confidence``):

* ``beta`` (default): ``y = sign(s - target)``; ``p`` = probability, under ``Beta(0.5 + w*s, 0.5 + w*(1-s))``
  (Jeffreys prior, weight ``w = beta_weight``), that the true score lies on the *observed* side of the target,
  floored at ``p_floor`` (> 0.5). The direction is never flipped, so an observation below the target always
  pushes the boost down. ``s == target`` carries no information (p = 0.5, a no-op update).
* ``fixed``: ``y = sign(s - target)``, ``p = fixed_p`` (0.5 when ``s == target``).
* ``authors_beta``: the authors' rule, kept for audits: ``y = +1`` if ``s >= target``; p as above; if
  ``p < 0.5`` the direction is flipped and ``p <- 1 - p``. Because the Beta shrinks toward 0.5, observations
  slightly *below* a 0.3 target are then counted as "above target" and the threshold is biased upward (towards
  more boost).

The authors' whole rule (reference protocol Sec. 3) is ``confidence: authors_beta``, ``beta_weight: 5``,
``query_weight: authors_sqrt``, ``round_decimals: 2``, ``grid_points: 10000`` and ``samples_per_step`` 5 for the
70B, 1 for the other models (a model's ``calibration`` block overrides the top-level one: :func:`model_settings`).

Batched API: generation is batched across latents, so a search is a :class:`BisectionState` per latent and one
step of many latents is evaluated together by a ``score_batch_fn(requests) -> scores`` (see :class:`ScoreRequest`);
:func:`calibrate_many` drives them.

Cache (the authors keyed theirs on the latent index alone, so a threshold calibrated under one target, judge or
repetition penalty was silently reused under another): the key is every resolved setting that can change a
generated token or a judged score (:class:`CalibrationKey`): the run context (:class:`CalibrationContext`, built by
:meth:`CalibrationContext.from_run` from the very objects that run the calibration: the model entry, the
generator's settings record, the judge's resolved config block and cache identity, the prompt list, the seed), every
search setting, the prior and bounds, the latent and its label. Every field of these frozen dataclasses is hashed
(``dataclasses.asdict``), so a setting added to any of them is in the key without further code; leaving one out
takes an entry with a reason in :data:`MODEL_FIELDS_NOT_IN_KEY`. One JSON file per key, named by the key's stable
hash and holding the key itself; a lookup whose key differs in any field misses. Failed calibrations are not
cached, so a rerun retries them. :func:`run_calibration_shard` is the resumable per-shard job."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esr.io import _json_default, read_json, stable_hash, write_json, write_parquet, write_text
from esr.latents import derive_seed
from esr.progress import Progress

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CONFIDENCE_METHODS = ("beta", "fixed", "authors_beta")
QUERY_WEIGHTS = ("half", "authors_sqrt")
#: ``ModelSpec`` fields left out of the calibration key, each with the reason it cannot change a threshold.
MODEL_FIELDS_NOT_IN_KEY: dict[str, str] = {
    "resources": "cluster request sizes (GPUs, memory, minutes); the device type that runs the model is keyed "
    "through the generator record ('device')",
}
ScoreBatchFn = Callable[[Sequence["ScoreRequest"]], Sequence["float | None"]]


class CalibrationError(ValueError):
    """A calibration setting or input is wrong; the message names the offending key and value."""


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class CalibrationSettings:
    """The ``calibration`` config block, with a model's ``models.<m>.calibration`` overrides applied
    (:func:`model_settings`); per-model prior and bounds come from :class:`BoostPrior`.

    ``max_new_tokens`` is not used by the search itself; it is part of the cache key and is passed to the score
    function in every request (the authors calibrated with 256 new tokens and generated trials with 512).
    ``query_weight``: the likelihood factor of the queried grid point, ``half`` (0.5, default) or ``authors_sqrt``
    (``sqrt(p(1-p))``). ``round_decimals``: decimals the threshold is rounded to (default null: none; authors 2).
    Source: reference protocol Sec. 3 (the authors' ``threshold_finder.py``)."""

    target: float = 0.3
    n_steps: int = 10
    samples_per_step: int = 5
    max_new_tokens: int = 256
    confidence: str = "beta"
    beta_weight: float = 5.0
    fixed_p: float = 0.7
    p_floor: float = 0.51
    grid_points: int = 10_000
    check_samples: int = 5
    query_weight: str = "half"
    round_decimals: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> CalibrationError:
            return CalibrationError(f"config key 'calibration.{key}' = {getattr(self, key)!r}: {why}")

        for key in ("target", "beta_weight", "fixed_p", "p_floor"):  # 0.3 and 3/10 must give the same cache key
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise bad(key, "must be a number")
            object.__setattr__(self, key, float(value))

        if not 0.0 < self.target < 1.0:
            raise bad("target", "must be strictly between 0 and 1 (scores are judged 0-100 and divided by 100)")
        for key in ("n_steps", "samples_per_step", "max_new_tokens", "check_samples"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "check_samples" else 1):
                raise bad(key, "must be a positive integer" + (" or 0" if key == "check_samples" else ""))
        if self.confidence not in CONFIDENCE_METHODS:
            raise bad("confidence", f"must be one of {', '.join(CONFIDENCE_METHODS)}")
        if not self.beta_weight > 0:
            raise bad("beta_weight", "must be > 0")
        if not 0.5 < self.fixed_p < 1.0:
            raise bad("fixed_p", "must be in (0.5, 1)")
        if not 0.5 < self.p_floor < 1.0:
            raise bad("p_floor", "must be in (0.5, 1)")
        if not isinstance(self.grid_points, int) or self.grid_points < 3:
            raise bad("grid_points", "must be an integer >= 3")
        if self.query_weight not in QUERY_WEIGHTS:
            raise bad("query_weight", f"must be one of {', '.join(QUERY_WEIGHTS)}")
        rd = self.round_decimals
        if rd is not None and (not isinstance(rd, int) or isinstance(rd, bool) or rd < 0):
            raise bad("round_decimals", "must be null or a non-negative integer")


def model_settings(block: Mapping[str, Any] | None, spec: Any) -> CalibrationSettings:
    """The calibration settings of one model: the top-level ``calibration`` block with the model entry's
    ``calibration`` block (``spec.calibration``, e.g. ``{samples_per_step: 5}``) laid over it. The authors used 5
    prompts per step for the 70B and 1 for the others (reference protocol Sec. 3, per-model settings).

    Raises :class:`CalibrationError` naming ``models.<model>.calibration.<key>`` for an unknown override key or a
    bad value."""
    overrides = dict(getattr(spec, "calibration", None) or {})
    where = f"models.{getattr(spec, 'name', '?')}.calibration"
    known = {f.name for f in dataclasses.fields(CalibrationSettings)}
    for key in overrides:
        if key not in known:
            raise CalibrationError(f"config key '{where}.{key}' is not a calibration setting (known: {sorted(known)})")
    try:
        return CalibrationSettings(**{**dict(block or {}), **overrides})
    except CalibrationError as err:
        if overrides:
            raise CalibrationError(f"{err} (with the overrides of '{where}': {overrides})") from None
        raise


@dataclass(frozen=True)
class BoostPrior:
    """Gaussian prior on the boost, truncated to the search bounds ``[lower, upper]`` (model config ``boost``)."""

    mean: float
    std: float
    lower: float
    upper: float

    def __post_init__(self) -> None:
        for name in ("mean", "std", "lower", "upper"):  # ints and floats must give the same cache key
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CalibrationError(f"config key 'boost.{name}' = {value!r} must be a number")
            object.__setattr__(self, name, float(value))
        if not self.std > 0:
            raise CalibrationError(f"config key 'boost.prior_std' = {self.std!r} must be > 0")
        if not self.lower < self.upper:
            raise CalibrationError(f"config key 'boost': lower ({self.lower!r}) must be below upper ({self.upper!r})")

    @classmethod
    def from_boost(cls, boost: Mapping[str, float]) -> BoostPrior:
        """From a model config ``boost`` dict (``prior_mean``, ``prior_std``, ``lower``, ``upper``)."""
        missing = [k for k in ("prior_mean", "prior_std", "lower", "upper") if k not in boost]
        if missing:
            raise CalibrationError(f"config key 'boost.{missing[0]}' is missing")
        return cls(
            mean=float(boost["prior_mean"]),
            std=float(boost["prior_std"]),
            lower=float(boost["lower"]),
            upper=float(boost["upper"]),
        )

    @classmethod
    def from_spec(cls, spec: Any) -> BoostPrior:
        """From an :class:`esr.config.ModelSpec` (its ``.boost`` dict)."""
        return cls.from_boost(spec.boost)

    @property
    def width(self) -> float:
        return self.upper - self.lower


# ---------------------------------------------------------------------------------------------------------------
# Confidence


def _beta_cdf(x: float, a: float, b: float) -> float:
    from scipy.special import betainc

    return float(betainc(a, b, x))


def direction_and_confidence(observed: float, settings: CalibrationSettings) -> tuple[int, float]:
    """Map an observed mean score to ``(y, p)``: ``y = +1`` means the root lies above the queried boost.

    See the module docstring for the three confidence models. A return of ``p == 0.5`` means "no information"."""
    target = settings.target
    method = settings.confidence
    if method == "fixed":
        if observed == target:
            return 1, 0.5
        return (1 if observed > target else -1), settings.fixed_p
    w = settings.beta_weight
    p_below = _beta_cdf(target, 0.5 + w * observed, 0.5 + w * (1.0 - observed))
    if method == "authors_beta":
        y = 1 if observed >= target else -1
        p = 1.0 - p_below if y == 1 else p_below
        if p < 0.5:
            y, p = -y, 1.0 - p
        return y, p
    # beta: no flip; the observed side decides the direction, p only says how sure we are.
    if observed == target:
        return 1, 0.5
    y = 1 if observed > target else -1
    p = 1.0 - p_below if y == 1 else p_below
    return y, max(p, settings.p_floor)


# ---------------------------------------------------------------------------------------------------------------
# One search


@dataclass(frozen=True)
class ScoreRequest:
    """One evaluation asked of the score function: generate ``n_samples`` steered answers for ``latent`` at
    ``boost`` (each on a distinct prompt), judge them, return the mean first-attempt score / 100.

    ``seed`` is derived from the run seed, latent, purpose and step, so the caller can draw prompts and sampling
    seeds reproducibly; ``purpose`` is ``"search"`` or ``"check"``."""

    latent: int
    boost: float
    n_samples: int
    seed: int
    step: int
    purpose: str
    max_new_tokens: int


@dataclass(frozen=True)
class StepRecord:
    """One bisection step: the query, what was observed, how it was read, and the posterior after the update."""

    step: int
    query: float
    observed: float
    direction: int
    p: float
    posterior_median: float
    ci90_low: float
    ci90_high: float
    seed: int


@dataclass
class BisectionState:
    """The probabilistic-bisection search of one latent. Use :meth:`next_query` / :meth:`request`, then
    :meth:`update` with the observed mean score; :meth:`result_value` gives the current answer."""

    latent: int
    prior: BoostPrior
    settings: CalibrationSettings
    seed: int = 0
    history: list[StepRecord] = field(default_factory=list)
    error: str | None = None
    grid: np.ndarray = field(init=False, repr=False)
    log_post: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.grid = np.linspace(self.prior.lower, self.prior.upper, self.settings.grid_points)
        log_prior = -0.5 * ((self.grid - self.prior.mean) / self.prior.std) ** 2
        self.log_post = log_prior - _logsumexp(log_prior)
        for rec in list(self.history):  # replaying a saved history reproduces the posterior exactly
            self._apply(rec.query, rec.direction, rec.p)

    @property
    def step(self) -> int:
        return len(self.history)

    @property
    def done(self) -> bool:
        return self.error is not None or self.step >= self.settings.n_steps

    def posterior(self) -> np.ndarray:
        """Normalised posterior mass on :attr:`grid`."""
        return np.exp(self.log_post - _logsumexp(self.log_post))

    def quantile(self, q: float) -> float:
        """The first grid point where the posterior CDF reaches ``q``."""
        cdf = np.cumsum(self.posterior())
        idx = int(np.searchsorted(cdf, q * cdf[-1], side="left"))
        return float(self.grid[min(idx, len(self.grid) - 1)])

    def median(self) -> float:
        return self.quantile(0.5)

    def next_query(self) -> float:
        """The boost to evaluate next: the posterior median."""
        return self.median()

    def step_seed(self, step: int | None = None, purpose: str = "search") -> int:
        return derive_seed(self.seed, "calibration", purpose, self.latent, self.step if step is None else step)

    def request(self) -> ScoreRequest:
        """The :class:`ScoreRequest` for the next search step."""
        return ScoreRequest(
            latent=self.latent,
            boost=self.next_query(),
            n_samples=self.settings.samples_per_step,
            seed=self.step_seed(),
            step=self.step,
            purpose="search",
            max_new_tokens=self.settings.max_new_tokens,
        )

    def update(self, x: float, observed: float) -> StepRecord:
        """Fold in the observed mean score ``observed`` (in [0, 1]) at boost ``x``; returns the step record."""
        if self.done:
            raise CalibrationError(
                f"latent {self.latent}: update after the search finished "
                f"(step {self.step} of {self.settings.n_steps}, error={self.error!r})"
            )
        observed = _check_score(observed, self.latent)
        y, p = direction_and_confidence(observed, self.settings)
        seed = self.step_seed()
        self._apply(float(x), y, p)
        rec = StepRecord(
            step=self.step,
            query=float(x),
            observed=observed,
            direction=y,
            p=p,
            posterior_median=self.median(),
            ci90_low=self.quantile(0.05),
            ci90_high=self.quantile(0.95),
            seed=seed,
        )
        self.history.append(rec)
        return rec

    def fail(self, message: str) -> None:
        """Stop this search with an error (e.g. the judge failed); the latent is then reported, not cached."""
        self.error = message

    def result_value(self) -> float:
        """The threshold: the posterior median, rounded to ``settings.round_decimals`` decimals when set."""
        value = self.median()
        decimals = self.settings.round_decimals
        return round(value, decimals) if decimals is not None else value

    def _apply(self, x: float, y: int, p: float) -> None:
        if p == 0.5:
            return
        above = self.grid > x
        below = self.grid < x
        upper_side, lower_side = (above, below) if y == 1 else (below, above)
        self.log_post[upper_side] += math.log(p)
        self.log_post[lower_side] += math.log(1.0 - p)
        # the query point itself: 0.5 (ours) or the authors' sqrt(p(1-p)) = the mean of the two sides' log factors
        if self.settings.query_weight == "authors_sqrt":
            self.log_post[~(above | below)] += 0.5 * (math.log(p) + math.log(1.0 - p))
        else:
            self.log_post[~(above | below)] += math.log(0.5)
        self.log_post -= _logsumexp(self.log_post)


def _logsumexp(a: np.ndarray) -> float:
    m = float(np.max(a))
    return m + math.log(float(np.sum(np.exp(a - m))))


def _check_score(value: Any, latent: int) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"latent {latent}: score {value!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise CalibrationError(f"latent {latent}: score {v!r} is outside [0, 1] (divide judge scores by 100)")
    return v


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class CalibrationResult:
    """The outcome for one latent. ``threshold`` is the posterior median; ``achieved_score`` the check at it.

    ``at_bound`` is ``"lower"``/``"upper"`` when the threshold sits within 1% of the range of a bound, a sign that
    the root may lie outside the bounds."""

    latent: int
    threshold: float | None
    achieved_score: float | None
    check_samples: int
    ci90_low: float | None
    ci90_high: float | None
    at_bound: str | None
    n_steps_done: int
    history: list[StepRecord]
    error: str | None = None
    key: dict[str, Any] | None = None
    key_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationResult:
        d = dict(d)
        d["history"] = [StepRecord(**h) for h in d.get("history", [])]
        return cls(**d)


def _result_from_state(state: BisectionState, achieved: float | None) -> CalibrationResult:
    if state.error is not None:
        return CalibrationResult(
            latent=state.latent,
            threshold=None,
            achieved_score=None,
            check_samples=0,
            ci90_low=None,
            ci90_high=None,
            at_bound=None,
            n_steps_done=state.step,
            history=list(state.history),
            error=state.error,
        )
    value = state.result_value()
    tol = 0.01 * state.prior.width
    at_bound = "lower" if value <= state.prior.lower + tol else "upper" if value >= state.prior.upper - tol else None
    return CalibrationResult(
        latent=state.latent,
        threshold=value,
        achieved_score=achieved,
        check_samples=state.settings.check_samples if achieved is not None else 0,
        ci90_low=state.quantile(0.05),
        ci90_high=state.quantile(0.95),
        at_bound=at_bound,
        n_steps_done=state.step,
        history=list(state.history),
    )


# ---------------------------------------------------------------------------------------------------------------
# Drivers


def _call_batch(score_batch_fn: ScoreBatchFn, requests: Sequence[ScoreRequest]) -> list[Any]:
    scores = list(score_batch_fn(requests))
    if len(scores) != len(requests):
        raise CalibrationError(f"score_batch_fn returned {len(scores)} scores for {len(requests)} requests")
    return scores


def calibrate_many(
    states: Sequence[BisectionState],
    score_batch_fn: ScoreBatchFn,
    n_steps: int | None = None,
    check: bool = True,
    progress: bool = False,
) -> list[CalibrationResult]:
    """Step all unfinished ``states`` together: each round sends one :class:`ScoreRequest` per active latent to
    ``score_batch_fn`` in a single call. ``n_steps`` caps the rounds run now (default: until all are done).

    A ``None``/NaN score fails that latent only (recorded as its error); a score outside [0, 1] raises. When every
    search is finished and ``check`` is set, one more batched call measures the achieved score at each threshold
    (``check_samples`` answers, purpose ``"check"``). Returns one result per state, in order."""
    rounds = max((s.settings.n_steps - s.step for s in states), default=0)
    if n_steps is not None:
        rounds = min(rounds, n_steps)
    meter = Progress(total=rounds, desc=f"calibration steps ({len(states)} latents together)", unit="steps")
    for _ in range(rounds):
        active = [s for s in states if not s.done]
        if not active:
            break
        requests = [s.request() for s in active]
        for state, req, score in zip(active, requests, _call_batch(score_batch_fn, requests)):
            if _is_missing(score):
                state.fail(f"no score at step {req.step} (boost {req.boost:.6g})")
            else:
                state.update(req.boost, score)
        if progress:
            meter.update(1)
    achieved: dict[int, float | None] = {}
    if check and all(s.done for s in states):
        checkable = [(i, s) for i, s in enumerate(states) if s.error is None and s.settings.check_samples > 0]
        requests = [
            ScoreRequest(
                latent=s.latent,
                boost=s.result_value(),
                n_samples=s.settings.check_samples,
                seed=s.step_seed(s.settings.n_steps, "check"),
                step=s.settings.n_steps,
                purpose="check",
                max_new_tokens=s.settings.max_new_tokens,
            )
            for _, s in checkable
        ]
        if requests:
            for (i, s), score in zip(checkable, _call_batch(score_batch_fn, requests)):
                achieved[i] = None if _is_missing(score) else _check_score(score, s.latent)
    return [_result_from_state(s, achieved.get(i)) for i, s in enumerate(states)]


# ---------------------------------------------------------------------------------------------------------------
# Cache


def sample_plan(request: ScoreRequest, n_prompts: int) -> list[tuple[int, int]]:
    """``(prompt_id, sampling_seed)`` for each of the ``request.n_samples`` answers of one request: distinct
    prompts out of ``n_prompts`` and per-answer seeds, all derived from ``request.seed`` (so a rerun of a step
    generates the same answers). The generation side may use this or its own scheme."""
    if request.n_samples > n_prompts:
        raise CalibrationError(
            f"config key 'calibration.samples_per_step' = {request.n_samples} exceeds the "
            f"{n_prompts} prompts (samples use distinct prompts)"
        )
    rng = np.random.default_rng(request.seed)
    prompts = rng.choice(n_prompts, size=request.n_samples, replace=False)
    seeds = rng.integers(0, 2**31 - 1, size=request.n_samples)
    return [(int(p), int(x)) for p, x in zip(prompts, seeds)]


@dataclass(frozen=True, kw_only=True)
class CalibrationContext:
    """Everything outside the search settings that can change a threshold. Build it with :meth:`from_run` from the
    objects that run the calibration; every field is in the cache key.

    ``model`` ... ``chat_template``: the model entry's identity, kept as flat readable columns of a cache file.
    ``model_settings``: every field of the model entry (:class:`esr.config.ModelSpec`) except those in
    :data:`MODEL_FIELDS_NOT_IN_KEY` (dtype, engine, tensor parallel, hub id, revision, SAE, layers, boost prior ...).
    ``weights``: the content of the weights behind those names (:func:`weights_fingerprint`), since a local model
    folder or a retrained embedded SAE keeps its path.
    ``generation``: the generator's full settings record (``SteeredGenerator.settings_record()``: temperature,
    repetition penalty, max new tokens, chat template, batch size, steer positions, injection / SAE / ablation
    layers, engine, tensor-parallel size, dtype, boost unit, median residual norm) plus the device type and the
    SAE's dtype (the steering vectors are its decoder rows).
    ``judge``: the judge's config block as resolved (every key of ``$defs/judge`` with its default filled in:
    backend, model, temperature, max_tokens, restart_gate, anchors ...) and the judge's own cache identity (which
    holds e.g. the fitted anchors' values behind ``anchors: auto``). ``prompts_sha256``: the prompt list the
    samples are drawn from. ``extra``: further ids that must split the cache."""

    model: str
    revision: str
    sae_id: str
    judge_id: str
    template_version: str
    repetition_penalty: float
    injection_layer: int
    sae_layer: int
    seed: int
    boost_unit: str = "raw"
    chat_template: str = "model"
    model_settings: Mapping[str, Any]
    weights: Mapping[str, Any]
    generation: Mapping[str, Any]
    judge: Mapping[str, Any]
    prompts_sha256: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        for name in ("injection_layer", "sae_layer", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_run(
        cls,
        *,
        spec: Any,
        generator: Any,
        judge_config: Mapping[str, Any],
        judge: Any,
        prompts: Sequence[str],
        seed: int,
        model_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> CalibrationContext:
        """The context of one calibration job, from the objects that run it: ``spec`` (an
        :class:`esr.config.ModelSpec`), ``generator`` (the ``SteeredGenerator`` that generates the answers: its
        ``settings_record()`` and device), ``judge_config`` (the judge block given to ``build_judge``) and ``judge``
        (the built judge: id, template version, ``cache_identity()``), the prompt list, the run seed and the model
        folder the weights were loaded from (for :func:`weights_fingerprint`)."""
        directions = getattr(generator, "directions", None)
        generation = {
            **generator.settings_record(),
            "device": torch_device_type(generator.loaded.device),
            "sae_dtype": str(directions.sae.W_dec.dtype) if directions is not None else None,
        }
        return cls(
            model=spec.name,
            revision=spec.revision,
            sae_id=spec.sae.ident,
            judge_id=judge.judge_id,
            template_version=judge.template_version,
            repetition_penalty=float(spec.repetition_penalty),
            injection_layer=int(spec.injection_layer),
            sae_layer=int(spec.sae_layer),
            seed=int(seed),
            boost_unit=spec.sae.boost_unit,
            chat_template=spec.chat_template,
            model_settings=model_key_settings(spec),
            weights=weights_fingerprint(spec, model_dir),
            generation=generation,
            judge={"config": resolved_judge_config(judge_config), "identity": judge.cache_identity()},
            prompts_sha256=stable_hash(list(prompts)),
            extra=dict(extra or {}),
        )


def model_key_settings(spec: Any) -> dict[str, Any]:
    """Every field of a model entry (:class:`esr.config.ModelSpec`) that can change what the model computes: all but
    :data:`MODEL_FIELDS_NOT_IN_KEY`, nested values as plain dicts (also part of the generation checkpoints' key)."""
    names = {f.name for f in dataclasses.fields(spec)}
    unknown = set(MODEL_FIELDS_NOT_IN_KEY) - names
    if unknown:
        raise CalibrationError(f"MODEL_FIELDS_NOT_IN_KEY names {sorted(unknown)}, which ModelSpec does not have")
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in MODEL_FIELDS_NOT_IN_KEY}


def weights_fingerprint(spec: Any, model_dir: str | Path | None = None) -> dict[str, Any]:
    """What the weights behind a model entry are, where its names do not pin them: ``model_files``, the per-file
    sha256 of the model folder's download manifest (``esr.assets.MANIFEST``, written by the download rule; None
    when the folder has none), and ``sae_files``, the sha256 of each file of a ``local``/``embedded`` SAE folder
    (a retrained embedded SAE keeps its path; None for ``sae_lens`` SAEs, pinned by release and id)."""
    from esr.assets import MANIFEST
    from esr.io import sha256_file
    from esr.sae import resolve_path

    model_files = None
    if model_dir is not None and (Path(model_dir) / MANIFEST).exists():
        model_files = {k: v.get("sha256") for k, v in read_json(Path(model_dir) / MANIFEST)["files"].items()}
    sae_files = None
    if spec.sae.source in ("local", "embedded") and spec.sae.path:
        sae_dir = resolve_path(spec.sae.path)
        if sae_dir.is_dir():
            sae_files = {str(p.relative_to(sae_dir)): sha256_file(p) for p in sorted(sae_dir.rglob("*")) if p.is_file()}
    return {"model_files": model_files, "sae_files": sae_files}


def torch_device_type(device: Any) -> str:
    """``"cuda"``, ``"cpu"``, ... of a torch device or device string (the index is not a setting)."""
    return str(getattr(device, "type", None) or str(device).split(":")[0])


def resolved_judge_config(block: Mapping[str, Any]) -> dict[str, Any]:
    """A judge config block as resolved: every key of the schema's ``$defs/judge`` (``workflow/schemas/
    config.schema.yaml``), the block's value or else the schema default. Raises :class:`CalibrationError` naming an
    unknown key."""
    from esr.config import load_schema

    props = load_schema()["$defs"]["judge"]["properties"]
    unknown = sorted(set(block) - set(props))
    if unknown:
        raise CalibrationError(f"judge config key {unknown[0]!r} is not a judge setting (known: {sorted(props)})")
    return {k: block[k] if k in block else prop.get("default") for k, prop in props.items()}


@dataclass(frozen=True)
class CalibrationKey:
    """The full cache key of one latent's calibration: the run context, the search settings, the prior and bounds,
    the latent and its label (the judge is shown the label, so a relabelled latent must not reuse a threshold)."""

    context: CalibrationContext
    settings: CalibrationSettings
    prior: BoostPrior
    latent: int
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A flat, JSON-normalised dict of every field (what is stored and compared)."""
        flat: dict[str, Any] = {"latent": int(self.latent), "label": str(self.label)}
        flat.update({f"context.{k}": v for k, v in dataclasses.asdict(self.context).items()})
        flat.update({f"settings.{k}": v for k, v in dataclasses.asdict(self.settings).items()})
        flat.update({f"prior.{k}": v for k, v in dataclasses.asdict(self.prior).items()})
        return json.loads(json.dumps(flat, sort_keys=True, default=str))

    def digest(self) -> str:
        return stable_hash(self.as_dict())

    def new_state(self) -> BisectionState:
        """A fresh search; its request seeds derive from (run seed, model), so models do not share seeds."""
        return BisectionState(
            latent=self.latent,
            prior=self.prior,
            settings=self.settings,
            seed=derive_seed(self.context.seed, self.context.model, "calibration"),
        )


def make_keys(
    context: CalibrationContext,
    settings: CalibrationSettings,
    prior: BoostPrior,
    latents: Iterable[int],
    labels: Mapping[int, str] | None = None,
) -> list[CalibrationKey]:
    """One key per latent (e.g. the latents of a selection file) under one configuration; ``labels``: latent ->
    the label the judge is shown (missing: "")."""
    labels = labels or {}
    return [
        CalibrationKey(context=context, settings=settings, prior=prior, latent=int(j), label=labels.get(int(j), ""))
        for j in latents
    ]


class CalibrationCache:
    """One JSON file per key under ``root`` (``<sha256 of the key>.json``), written atomically (a temporary file in
    the same folder, then ``os.replace``: concurrent jobs sharing the folder leave complete entries only) with a
    SHA-256 ``checksum`` over the rest of the entry. A file that is truncated, edited (checksum mismatch), lacks a
    checksum or stores another key is a miss: a WARNING names the file, the latent is calibrated again and the file
    overwritten; it is never returned. A ``read_only`` cache (the non-writer ranks of a tensor-parallel stage) reads
    but never writes."""

    def __init__(self, root: str | Path, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only

    def path_for(self, key: CalibrationKey) -> Path:
        return self.root / f"{key.digest()}.json"

    def get(self, key: CalibrationKey) -> CalibrationResult | None:
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            blob = read_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("calibration cache file %s is unreadable (%s); treating as a miss", path, exc)
            return None
        if not isinstance(blob, dict) or blob.get("checksum") != _entry_checksum(blob):
            why = "has no checksum" if isinstance(blob, dict) and "checksum" not in blob else "fails its checksum"
            log.warning("calibration cache file %s %s (edited or damaged); treating as a miss", path, why)
            return None
        if blob.get("key") != key.as_dict():
            log.warning("calibration cache file %s holds a different key; treating as a miss", path)
            return None
        try:
            return CalibrationResult.from_dict(blob["result"])
        except (KeyError, TypeError) as exc:
            log.warning("calibration cache file %s holds no readable result (%s); treating as a miss", path, exc)
            return None

    def __contains__(self, key: CalibrationKey) -> bool:
        return self.get(key) is not None

    def put(self, key: CalibrationKey, result: CalibrationResult, provenance: Mapping[str, Any] | None = None) -> Path:
        """Store a successful result (a failed one raises: errors are retried, never cached)."""
        if result.error is not None:
            raise CalibrationError(f"latent {key.latent}: refusing to cache a failed calibration ({result.error})")
        if result.latent != key.latent:
            raise CalibrationError(f"result for latent {result.latent} stored under a key for latent {key.latent}")
        if self.read_only:
            return self.path_for(key)
        result = dataclasses.replace(result, key=key.as_dict(), key_digest=key.digest())
        blob = {
            "key": key.as_dict(),
            "key_digest": key.digest(),
            "result": result.to_dict(),
            "provenance": dict(provenance or {}),
        }
        blob["checksum"] = _entry_checksum(blob)
        return write_json(self.path_for(key), blob)


def _entry_checksum(blob: Mapping[str, Any]) -> str:
    """SHA-256 of a cache entry's JSON form without its ``checksum`` field (normalised through a JSON round trip,
    so the written and the read-back entry hash alike)."""
    body = {k: v for k, v in blob.items() if k != "checksum"}
    return stable_hash(json.loads(json.dumps(body, default=_json_default)))


# ---------------------------------------------------------------------------------------------------------------
# Shard runner


def run_calibration_shard(
    keys: Sequence[CalibrationKey],
    score_batch_fn: ScoreBatchFn,
    cache: CalibrationCache,
    batch_size: int = 16,
    out_path: str | Path | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[CalibrationResult]:
    """Calibrate every key not already in ``cache``, ``batch_size`` latents stepped together, and store each
    successful result in the cache as soon as its batch finishes (so an interrupted shard resumes where it
    stopped). Returns results in ``keys`` order (cached and new); with ``out_path`` also writes them as one JSON
    file (atomically). Failed latents are returned with their error and are retried on the next run."""
    if batch_size < 1:
        raise CalibrationError(f"batch_size = {batch_size!r} must be >= 1")
    digests = [k.digest() for k in keys]
    if len(set(digests)) != len(digests):
        raise CalibrationError("duplicate calibration keys in one shard")
    results: dict[str, CalibrationResult] = {}
    pending: list[CalibrationKey] = []
    for key, digest in zip(keys, digests):
        hit = cache.get(key)
        if hit is not None:
            results[digest] = hit
        else:
            pending.append(key)
    log.info("calibration shard: %d cached, %d to run", len(results), len(pending))
    bar = Progress(total=len(pending), desc="calibrating latents", unit="latents")
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        states = [k.new_state() for k in chunk]
        for key, res in zip(chunk, calibrate_many(states, score_batch_fn, progress=progress)):
            res = dataclasses.replace(res, key=key.as_dict(), key_digest=key.digest())
            if res.error is None:
                cache.put(key, res, provenance)
            results[key.digest()] = res
        if progress:
            bar.update(len(chunk))
    ordered = [results[d] for d in digests]
    if out_path is not None:
        write_json(out_path, {"provenance": dict(provenance or {}), "results": [r.to_dict() for r in ordered]})
    return ordered


def read_shard_results(path: str | Path) -> list[CalibrationResult]:
    """Read a file written by :func:`run_calibration_shard`."""
    return [CalibrationResult.from_dict(d) for d in read_json(path)["results"]]


# ---------------------------------------------------------------------------------------------------------------
# Tables


def calibration_table(results: Iterable[CalibrationResult]) -> pd.DataFrame:
    """One row per latent: model, latent, threshold, achieved score, 90% interval, bound flag, error, target, judge."""
    import pandas as pd

    rows = []
    for r in results:
        key = r.key or {}
        rows.append(
            {
                "model": key.get("context.model"),
                "latent": r.latent,
                "threshold": r.threshold,
                "achieved_score": r.achieved_score,
                "check_samples": r.check_samples,
                "ci90_low": r.ci90_low,
                "ci90_high": r.ci90_high,
                "at_bound": r.at_bound,
                "n_steps_done": r.n_steps_done,
                "error": r.error,
                "target": key.get("settings.target"),
                "judge_id": key.get("context.judge_id"),
                "confidence": key.get("settings.confidence"),
                "key_digest": r.key_digest,
            }
        )
    columns = [
        "model",
        "latent",
        "threshold",
        "achieved_score",
        "check_samples",
        "ci90_low",
        "ci90_high",
        "at_bound",
        "n_steps_done",
        "error",
        "target",
        "judge_id",
        "confidence",
        "key_digest",
    ]
    return pd.DataFrame(rows, columns=columns)


def read_thresholds(path: str | Path) -> dict[int, float | None]:
    """latent -> calibrated boost threshold from ``thresholds.parquet``; None where the calibration failed (those
    latents run no trials)."""
    import pandas as pd

    df = pd.read_parquet(path)
    failed = df["error"].notna() if "error" in df.columns else pd.Series(False, index=df.index)
    return {
        int(lat): None if bad or pd.isna(thr) else float(thr)
        for lat, thr, bad in zip(df["latent"], df["threshold"], failed)
    }


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table atomically as parquet (``.parquet``) or CSV (``.csv``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return write_parquet(path, df)
    if path.suffix == ".csv":
        return write_text(path, df.to_csv(index=False))
    raise CalibrationError(f"table path {str(path)!r} must end in .parquet or .csv")


def summarize_thresholds(
    df: pd.DataFrame,
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    by: str | None = "model",
) -> pd.DataFrame:
    """Distribution summary of thresholds and achieved scores: counts (ok, failed, at a bound), mean, and the
    given quantiles of ``threshold`` and ``achieved_score``; one row per ``by`` group (or one row overall)."""
    import pandas as pd

    def one(g: pd.DataFrame) -> dict[str, Any]:
        ok = g[g["error"].isna()]
        row: dict[str, Any] = {
            "n": len(g),
            "n_ok": len(ok),
            "n_failed": int(g["error"].notna().sum()),
            "n_at_lower": int((ok["at_bound"] == "lower").sum()),
            "n_at_upper": int((ok["at_bound"] == "upper").sum()),
        }
        for col in ("threshold", "achieved_score"):
            vals = pd.to_numeric(ok[col], errors="coerce").dropna()
            row[f"{col}_mean"] = float(vals.mean()) if len(vals) else math.nan
            for q in quantiles:
                row[f"{col}_q{q:g}"] = float(vals.quantile(q)) if len(vals) else math.nan
        return row

    if by is None:
        return pd.DataFrame([one(df)])
    return pd.DataFrame([{by: name, **one(g)} for name, g in df.groupby(by, dropna=False, sort=True)])

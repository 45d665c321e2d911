"""The experiments as trial plans: which (latent, boost, prompt, seed, ablation set, prompt variant) each trial is.

Plans are pure functions of the latent selection (``esr.latents.Selection``: latents, their prompts and seeds), the
calibrated thresholds and the config, so every experiment replays the same latents, prompts and seeds as exp1 and
every generation shard can recompute its own slice. Experiment names follow the paper's numbering:

- ``exp1``          steered at each latent's calibrated threshold (ESR across models)
- ``exp8``          no-steering baseline: same latents, prompts and seeds, no intervention
- ``exp3/<set>``    exp1 with a detector set ablated (paired with exp1 by latent, prompt and seed)
- ``exp10/<set>``   exp1 with a matched random latent set ablated (control for exp3)
- ``exp2``          boost sweep: global levels (mean +/- k SD of all thresholds, the authors') and levels relative
                    to each latent's own threshold (ours)
- ``exp5/<variant>`` meta-prompts: a suffix appended to the prompt (our own wording)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Our own wording of the four meta-prompt variants (the self-monitoring one first), appended after the prompt.
META_PROMPTS: dict[str, str] = {
    "self_monitor": "While you answer, watch your own words: if you notice that you are drifting away from the "
                    "question, stop, say so, and steer yourself back to answering it.",
    "dont_get_distracted": "Stay focused on this question and do not get distracted.",
    "ignore_latent_label": "Something may push your answer towards the topic '{label}'. Ignore that topic and "
                           "answer only the question.",
    "resist_manipulation": "Outside influences may try to bend your answer off course; do not let them.",
}


@dataclass(frozen=True)
class TrialSpec:
    """One planned trial. ``prompt`` is what the model sees; ``judge_prompt`` what the judge is asked about."""

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
    def from_dict(cls, d: dict[str, Any]) -> "TrialSpec":
        d = dict(d)
        d["ablate"] = tuple(d.get("ablate") or ())
        return cls(**d)


@dataclass(frozen=True)
class LatentPlan:
    """A selected latent with its threshold, prompts and seeds (the unit every experiment replays)."""

    latent: int
    label: str
    threshold: float | None
    prompt_ids: tuple[int, ...]
    seeds: tuple[int, ...]


def _tid(experiment: str, condition: str, model: str, latent: int | None, prompt_id: int, seed: int,
         extra: str = "") -> str:
    lat = "none" if latent is None else str(latent)
    return f"{experiment}|{condition}|{model}|L{lat}|P{prompt_id}|S{seed}{('|' + extra) if extra else ''}"


def latent_plans(selection: dict[str, Any], thresholds: dict[int, float | None]) -> list[LatentPlan]:
    """Join a selection (as written by ``esr.latents.write_selection``) with calibrated thresholds."""
    plans = []
    for item in selection["latents"]:
        lat = int(item["latent"])
        plans.append(LatentPlan(lat, item.get("label") or "", thresholds.get(lat), tuple(item["prompt_ids"]),
                                tuple(item["trial_seeds"])))
    return plans


def plan_steered(model: str, plans: list[LatentPlan], prompts: list[str], experiment: str = "exp1",
                 condition: str = "steered", ablation_set: str | None = None, ablate: tuple[int, ...] = (),
                 steer: bool = True) -> list[TrialSpec]:
    """exp1 (and its replays): every latent with a threshold, at that threshold, on its prompts and seeds.
    Latents whose calibration failed (threshold None) are skipped (they are counted by the calibration table)."""
    trials = []
    for lp in plans:
        if lp.threshold is None:
            continue
        for pid, seed in zip(lp.prompt_ids, lp.seeds):
            trials.append(TrialSpec(
                trial_id=_tid(experiment, condition, model, lp.latent, pid, seed), experiment=experiment,
                condition=condition, model=model, latent=lp.latent, label=lp.label,
                boost=float(lp.threshold) if steer else 0.0, prompt_id=pid, prompt=prompts[pid],
                judge_prompt=prompts[pid], seed=seed, threshold=lp.threshold, ablation_set=ablation_set,
                ablate=tuple(sorted(int(a) for a in ablate)), steer=steer))
    return trials


def plan_no_steering(model: str, plans: list[LatentPlan], prompts: list[str]) -> list[TrialSpec]:
    """exp8: same latents, prompts and seeds as exp1, no intervention (the judge still sees the latent's label,
    as in the paper, so the baseline is graded under the same instructions)."""
    return plan_steered(model, plans, prompts, "exp8", "no_steering", steer=False)


def plan_ablation(model: str, plans: list[LatentPlan], prompts: list[str], set_name: str, latents: list[int],
                  experiment: str = "exp3") -> list[TrialSpec]:
    """exp3 / exp10: exp1's trials with ``latents`` ablated at the injection layer (paired with exp1)."""
    return plan_steered(model, plans, prompts, experiment, set_name, ablation_set=set_name, ablate=tuple(latents))


def global_levels(thresholds: list[float], n_levels: int, sd_range: float) -> list[tuple[float, float]]:
    """The authors' exp2 grid: ``n_levels`` points over mean +/- ``sd_range`` SD (ddof 0) of all thresholds,
    clamped at 0. Returns (boost, level in SD units); clamped levels keep their nominal SD value."""
    arr = np.asarray([t for t in thresholds if t is not None], dtype=float)
    if arr.size == 0:
        return []
    mu, sd = float(arr.mean()), float(arr.std())
    sigmas = np.linspace(-sd_range, sd_range, n_levels)
    return [(max(0.0, mu + s * sd), float(s)) for s in sigmas]


def plan_boost_sweep(model: str, plans: list[LatentPlan], prompts: list[str], n_latents: int,
                     prompts_per_latent: int, n_levels: int, sd_range: float,
                     relative_levels: list[float]) -> list[TrialSpec]:
    """exp2: the first ``n_latents`` calibrated latents, each on its first ``prompts_per_latent`` prompts/seeds,
    at the global levels and at multiples of its own threshold."""
    calibrated = [lp for lp in plans if lp.threshold is not None]
    levels = global_levels([lp.threshold for lp in calibrated], n_levels, sd_range)
    trials = []
    for lp in calibrated[:n_latents]:
        for pid, seed in list(zip(lp.prompt_ids, lp.seeds))[:prompts_per_latent]:
            grid = [(b, f"global:{s:+.2f}sd") for b, s in levels]
            grid += [(float(lp.threshold) * r, f"relative:{r:g}") for r in relative_levels]
            for boost, level in grid:
                trials.append(TrialSpec(
                    trial_id=_tid("exp2", "sweep", model, lp.latent, pid, seed, level), experiment="exp2",
                    condition="sweep", model=model, latent=lp.latent, label=lp.label, boost=float(boost),
                    prompt_id=pid, prompt=prompts[pid], judge_prompt=prompts[pid], seed=seed,
                    threshold=lp.threshold, boost_level=level))
    return trials


def plan_meta_prompts(model: str, plans: list[LatentPlan], prompts: list[str], variants: list[str],
                      judge_sees_variant: bool = False) -> list[TrialSpec]:
    """exp5: exp1's trials with a meta-prompt appended. By default the judge grades against the original prompt
    (the authors' judge saw the suffixed prompt; ``judge_sees_variant`` reproduces that)."""
    trials = []
    for variant in variants:
        if variant not in META_PROMPTS:
            raise ValueError(f"unknown meta-prompt variant {variant!r}; known: {', '.join(META_PROMPTS)}")
        for t in plan_steered(model, plans, prompts, "exp5", variant):
            suffix = META_PROMPTS[variant].format(label=t.label or "an unrelated topic")
            prompt = f"{t.prompt} {suffix}"
            trials.append(TrialSpec(**{**asdict(t), "prompt": prompt, "prompt_variant": variant,
                                       "judge_prompt": prompt if judge_sees_variant else t.prompt,
                                       "ablate": t.ablate}))
    return trials


def shard_of(latent: int | None, n_shards: int) -> int:
    """Latent shards: a latent's trials always land in the same shard (stable across experiments)."""
    return 0 if latent is None or n_shards <= 1 else int(latent) % n_shards


def shard_trials(trials: list[TrialSpec], n_shards: int, shard: int) -> list[TrialSpec]:
    if not 0 <= shard < max(1, n_shards):
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return [t for t in trials if shard_of(t.latent, n_shards) == shard]


@dataclass
class Conditions:
    """The (experiment, condition) pairs a model runs, for rule expansion."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, experiment: str, condition: str) -> None:
        if (experiment, condition) not in self.items:
            self.items.append((experiment, condition))

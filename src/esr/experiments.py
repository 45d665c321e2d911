"""The experiments: one registry entry each, and their trial plans.

``REGISTRY`` maps each experiment name of the paper's numbering to an :class:`Experiment`: the conditions it runs
for a model (from the config), how its trials are planned, which rule makes its trials table, whether it captures
per-token activations, how it is summarised and whether it is compared with exp1. The Snakemake rules
(``workflow/rules/common.smk``), the generation stage and the statistics stages all read it, so adding an
experiment is one entry here (plus a rule if it is made by a new kind of job).

Plans are pure functions of the latent selection (latents, their prompts and seeds), the calibrated thresholds and
the config, so every experiment replays the same latents, prompts and seeds as exp1 and every generation shard can
recompute its own slice:

- ``exp1``           steered at each latent's calibrated threshold (paper Sec. 3.1, Fig. 2)
- ``exp8``           no-steering baseline: same latents, prompts and seeds, no intervention (App. A.3.1)
- ``exp3/<set>``     exp1 with an off-topic-detector set ablated, paired with exp1 by latent, prompt and seed (Sec. 3.4, Fig. 5)
- ``exp10/<set>``    exp1 with a matched random latent set ablated (control for exp3, App. A.3.3)
- ``exp2``           boost sweep: global levels (mean +/- k SD of all thresholds, the authors') and levels relative
                     to each latent's own threshold (ours) (Sec. 3.2, Fig. 3)
- ``exp5/<variant>`` meta-prompts: a suffix appended to the prompt, our own wording (Sec. 3.3, Fig. 4)
- ``planted``        the embedded default's labelled positive control: restart text planted into exp1 answers
- ``exp7``           cross-judge regrade of exp1 (App. A.2.2); ``exp9`` per-token activations around self-corrections
                     (Sec. 3.6, Fig. 6, App. A.4)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from esr.config import ModelSpec
from esr.detectors import DetectorSets
from esr.latents import Selection
from esr.trials import TrialSpec

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
class LatentPlan:
    """A selected latent with its threshold, prompts and seeds (the unit every experiment replays)."""

    latent: int
    label: str
    threshold: float | None
    prompt_ids: tuple[int, ...]
    seeds: tuple[int, ...]


def _tid(
    experiment: str, condition: str, model: str, latent: int | None, prompt_id: int, seed: int, extra: str = ""
) -> str:
    lat = "none" if latent is None else str(latent)
    return f"{experiment}|{condition}|{model}|L{lat}|P{prompt_id}|S{seed}{('|' + extra) if extra else ''}"


def latent_plans(selection: Selection, thresholds: Mapping[int, float | None]) -> list[LatentPlan]:
    """Join a selection (``esr.latents.read_selection``) with calibrated thresholds (``calibration.read_thresholds``)."""
    return [
        LatentPlan(s.latent, s.label or "", thresholds.get(s.latent), tuple(s.prompt_ids), tuple(s.trial_seeds))
        for s in selection.latents
    ]


def plan_steered(
    model: str,
    plans: list[LatentPlan],
    prompts: list[str],
    experiment: str = "exp1",
    condition: str = "steered",
    ablation_set: str | None = None,
    ablate: tuple[int, ...] = (),
    steer: bool = True,
) -> list[TrialSpec]:
    """exp1 (and its replays): every latent with a threshold, at that threshold, on its prompts and seeds.
    Latents whose calibration failed (threshold None) are skipped (they are counted by the calibration table)."""
    trials = []
    for lp in plans:
        if lp.threshold is None:
            continue
        for pid, seed in zip(lp.prompt_ids, lp.seeds):
            trials.append(
                TrialSpec(
                    trial_id=_tid(experiment, condition, model, lp.latent, pid, seed),
                    experiment=experiment,
                    condition=condition,
                    model=model,
                    latent=lp.latent,
                    label=lp.label,
                    boost=float(lp.threshold) if steer else 0.0,
                    prompt_id=pid,
                    prompt=prompts[pid],
                    judge_prompt=prompts[pid],
                    seed=seed,
                    threshold=lp.threshold,
                    ablation_set=ablation_set,
                    ablate=tuple(sorted(int(a) for a in ablate)),
                    steer=steer,
                )
            )
    return trials


def plan_no_steering(model: str, plans: list[LatentPlan], prompts: list[str]) -> list[TrialSpec]:
    """exp8: same latents, prompts and seeds as exp1, no intervention (the judge still sees the latent's label,
    as in the paper, so the baseline is graded under the same instructions)."""
    return plan_steered(model, plans, prompts, "exp8", "no_steering", steer=False)


def plan_ablation(
    model: str, plans: list[LatentPlan], prompts: list[str], set_name: str, latents: list[int], *, experiment: str
) -> list[TrialSpec]:
    """exp3 / exp10 (and any ablation experiment): exp1's trials with ``latents`` ablated at the ablation layer,
    paired with exp1 by latent, prompt and seed."""
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


def plan_boost_sweep(
    model: str,
    plans: list[LatentPlan],
    prompts: list[str],
    n_latents: int,
    prompts_per_latent: int,
    n_levels: int,
    sd_range: float,
    relative_levels: list[float],
) -> list[TrialSpec]:
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
                trials.append(
                    TrialSpec(
                        trial_id=_tid("exp2", "sweep", model, lp.latent, pid, seed, level),
                        experiment="exp2",
                        condition="sweep",
                        model=model,
                        latent=lp.latent,
                        label=lp.label,
                        boost=float(boost),
                        prompt_id=pid,
                        prompt=prompts[pid],
                        judge_prompt=prompts[pid],
                        seed=seed,
                        threshold=lp.threshold,
                        boost_level=level,
                    )
                )
    return trials


def plan_meta_prompts(
    model: str, plans: list[LatentPlan], prompts: list[str], variants: list[str], judge_sees_variant: bool = False
) -> list[TrialSpec]:
    """exp5: exp1's trials with a meta-prompt appended. By default the judge grades against the original prompt
    (the authors' judge saw the suffixed prompt; ``judge_sees_variant`` reproduces that)."""
    trials = []
    for variant in variants:
        if variant not in META_PROMPTS:
            raise ValueError(f"unknown meta-prompt variant {variant!r}; known: {', '.join(META_PROMPTS)}")
        for t in plan_steered(model, plans, prompts, "exp5", variant):
            suffix = META_PROMPTS[variant].format(label=t.label or "an unrelated topic")
            prompt = f"{t.prompt} {suffix}"
            trials.append(
                TrialSpec(
                    **{
                        **asdict(t),
                        "prompt": prompt,
                        "prompt_variant": variant,
                        "judge_prompt": prompt if judge_sees_variant else t.prompt,
                        "ablate": t.ablate,
                    }
                )
            )
    return trials


def shard_of(latent: int | None, n_shards: int) -> int:
    """Latent shards: a latent's trials always land in the same shard (stable across experiments)."""
    return 0 if latent is None or n_shards <= 1 else int(latent) % n_shards


def shard_trials(trials: list[TrialSpec], n_shards: int, shard: int) -> list[TrialSpec]:
    if not 0 <= shard < max(1, n_shards):
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return [t for t in trials if shard_of(t.latent, n_shards) == shard]


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is computed from: the model, its selected latents joined with their thresholds, the prompt list,
    the detector and control sets (``detectors.json``) and the ``experiments`` config block."""

    model: str
    latents: list[LatentPlan]
    prompts: list[str]
    detectors: DetectorSets
    settings: Mapping[str, Any]


Conditions = Callable[[Mapping[str, Any], ModelSpec], list[str]]
Planner = Callable[[PlanInputs, str], list[TrialSpec]]


@dataclass(frozen=True)
class Experiment:
    """One experiment of the paper's numbering.

    ``conditions(config, spec)``: the condition wildcards it runs for a model ([] = not run). ``made_by``: the rule
    that makes its trials (``generate``: planned by ``plan`` and generated; ``plant_restarts``: derived from exp1 and
    exp8; ``cross_judge``: a regrade of exp1; ``sequential``: exp9, no trials table). ``capture``: per-token SAE
    activations are stored during generation. ``summary``: how the ``summarise`` rule summarises its trials table
    (``trials``, ``cross_judge``; ``None``: its producer writes the summary). ``compare``: compared with exp1 in
    ``results/comparisons/<model>.json``. ``figure``: the per-model figure it feeds (``ablation``,
    ``meta_prompts``, ``boost_sweep``)."""

    name: str
    description: str
    conditions: Conditions
    made_by: Literal["generate", "plant_restarts", "cross_judge", "sequential"]
    plan: Planner | None = None
    capture: bool = False
    summary: Literal["trials", "cross_judge"] | None = "trials"
    compare: bool = False
    figure: Literal["ablation", "meta_prompts", "boost_sweep"] | None = None

    @property
    def graded(self) -> bool:
        """Whether the ``grade`` rule grades its generated shards (the others grade in their own rule)."""
        return self.made_by in ("generate", "plant_restarts")


def _exp(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("experiments") or {}


def ablation_planner(experiment: str, latent_sets: Callable[[PlanInputs], Mapping[str, list[int]]]) -> Planner:
    """A planner for an ablation experiment: the condition names a latent set in ``latent_sets(inputs)``; its trials
    are exp1's with that set ablated (``plan_ablation``)."""

    def planner(inputs: PlanInputs, condition: str) -> list[TrialSpec]:
        latents = latent_sets(inputs).get(condition) or []
        if not latents:
            # a discovery that found no detectors (or no control matched to them) leaves this condition empty: it
            # is run as zero trials and reported as empty, never silently replaced by another set
            return []
        return plan_ablation(inputs.model, inputs.latents, inputs.prompts, condition, latents, experiment=experiment)

    return planner


def _sweep(inputs: PlanInputs, condition: str) -> list[TrialSpec]:
    c = inputs.settings["boost_sweep"]
    return plan_boost_sweep(
        inputs.model,
        inputs.latents,
        inputs.prompts,
        c["n_latents"],
        c["prompts_per_latent"],
        c["n_levels"],
        c["sd_range"],
        c["relative_levels"],
    )


def _meta(inputs: PlanInputs, condition: str) -> list[TrialSpec]:
    c = inputs.settings["meta_prompts"]
    return plan_meta_prompts(inputs.model, inputs.latents, inputs.prompts, [condition], c["judge_sees_variant"])


def _random_sets(config: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    if not _exp(config).get("random_control", True):
        return []
    return [f"random_{i}" for i in range(config["detectors"]["random_control"]["n_sets"])]


REGISTRY: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "exp1",
            "steered at each latent's calibrated threshold",
            lambda c, s: ["steered"],
            "generate",
            plan=lambda i, cond: plan_steered(i.model, i.latents, i.prompts),
            capture=True,
        ),
        Experiment(
            "exp8",
            "no-steering baseline (same latents, prompts, seeds)",
            lambda c, s: ["no_steering"] if _exp(c).get("no_steering", True) else [],
            "generate",
            plan=lambda i, cond: plan_no_steering(i.model, i.latents, i.prompts),
            compare=True,
        ),
        Experiment(
            "exp3",
            "ablation of off-topic-detector sets",
            lambda c, s: list(_exp(c).get("ablation", [])) + list(s.paper_detector_sets),
            "generate",
            plan=ablation_planner("exp3", lambda i: i.detectors.detector_sets),
            compare=True,
            figure="ablation",
        ),
        Experiment(
            "exp10",
            "ablation of matched random latent sets (control for exp3)",
            _random_sets,
            "generate",
            plan=ablation_planner("exp10", lambda i: i.detectors.random_sets),
            compare=True,
            figure="ablation",
        ),
        Experiment(
            "exp2",
            "boost sweep",
            lambda c, s: ["sweep"] if _exp(c).get("boost_sweep", {}).get("enabled", False) else [],
            "generate",
            plan=_sweep,
            figure="boost_sweep",
        ),
        Experiment(
            "exp5",
            "meta-prompts",
            lambda c, s: list(_exp(c).get("meta_prompts", {}).get("variants", [])),
            "generate",
            plan=_meta,
            compare=True,
            figure="meta_prompts",
        ),
        Experiment(
            "planted",
            "labelled positive control: restart text planted into exp1 answers (embedded only)",
            lambda c, s: ["restart"] if _exp(c).get("planted_control", {}).get("enabled", False) else [],
            "plant_restarts",
            compare=True,
        ),
        Experiment(
            "exp7",
            "cross-judge regrade of exp1",
            lambda c, s: ["regrade"] if (c.get("cross_judge") or {}).get("judges") else [],
            "cross_judge",
            summary="cross_judge",
        ),
        Experiment(
            "exp9",
            "per-token detector activations around self-corrections",
            lambda c, s: ["episodes"],
            "sequential",
            summary=None,
        ),
    )
}


def experiment(name: str) -> Experiment:
    """The registry entry of ``name``; a ``KeyError`` naming the known experiments otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}") from None


def plan(name: str, condition: str, inputs: PlanInputs) -> list[TrialSpec]:
    """The trials of one (experiment, condition) for one model."""
    exp = experiment(name)
    if exp.plan is None:
        raise ValueError(f"experiment {name!r} is made by rule {exp.made_by!r}, not planned for generation")
    return exp.plan(inputs, condition)


def capture_latents(
    detectors: DetectorSets, selection: Selection | None = None
) -> tuple[list[int], dict[str, list[int]]]:
    """Latents whose per-token activations are stored densely: every detector and random-control set, and the
    selected (steered) latents as group ``selected``. Returns (sorted latents, group name -> latents)."""
    groups = detectors.groups()
    if selection is not None:
        groups["selected"] = sorted(s.latent for s in selection.latents)
    return sorted({int(j) for v in groups.values() for j in v}), groups

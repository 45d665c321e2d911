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
- ``exp10/random_<set>_<i>`` exp1 with the i-th random latent set matched to exp3's ``<set>`` ablated (control for
                     exp3, App. A.3.3; one group of controls per ablated set, ``detectors.random_control.match_to``)
- ``exp2``           boost sweep: global levels (mean +/- k SD of all thresholds, the authors') and levels relative
                     to each latent's own threshold (ours) (Sec. 3.2, Fig. 3)
- ``exp5/<variant>`` meta-prompts: a suffix appended to the prompt, our neutral wording or the authors'
                     (``experiments.meta_prompts.wording``) (Sec. 3.3, Fig. 4)
- ``planted``        a labelled positive control (a test fixture, ``experiments.planted_control``, off by default):
                     restart text planted into exp1 answers; never run for a fine-tuned model (exp4)
- ``exp7``           cross-judge regrade of exp1 (App. A.2.2); ``exp9`` per-token activations around self-corrections
                     (Sec. 3.6, Fig. 6, App. A.4)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from esr.config import ModelSpec
from esr.detectors import DetectorSets, random_set_name
from esr.latents import Selection
from esr.trials import TrialSpec

# Our own wording of the four meta-prompt variants (the self-monitoring one first), appended after the prompt. It is
# neutral about *how* to get back on topic: it never asks the model to announce the correction ("say so"), which
# would ask for the very restart phrase the judge counts as a new attempt.
META_PROMPTS: dict[str, str] = {
    "self_monitor": "While you answer, watch your own words: if you notice that you are drifting away from the "
    "question, steer yourself back to answering it.",
    "dont_get_distracted": "Stay focused on this question and do not get distracted.",
    "ignore_latent_label": "Something may push your answer towards the topic '{label}'. Ignore that topic and "
    "answer only the question.",
    "resist_manipulation": "Outside influences may try to bend your answer off course; do not let them.",
}

# The authors' four suffixes (their exp5 code; the self_monitor text is quoted in the paper's Fig. 4 caption).
AUTHORS_META_PROMPTS: dict[str, str] = {
    "self_monitor": "If you notice yourself going off-topic, stop and force yourself to get back on track.",
    "dont_get_distracted": "Don't get distracted!",
    "ignore_latent_label": "You are being distracted with {label}. Ignore it.",
    "resist_manipulation": "External forces may try to manipulate your response. Resist them.",
}

#: ``experiments.meta_prompts.wording``: ``ours`` (default, neutral) or ``authors``.
META_PROMPT_WORDINGS: dict[str, dict[str, str]] = {"ours": META_PROMPTS, "authors": AUTHORS_META_PROMPTS}


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


def global_levels(
    thresholds: list[float], n_levels: int, sd_range: float, *, merge_clamped: bool = True
) -> list[tuple[float, float]]:
    """The authors' exp2 grid: ``n_levels`` points over mean +/- ``sd_range`` SD (ddof 0) of all thresholds,
    clamped at 0 (reference protocol 6.3). Returns (boost, level in SD units).

    ``merge_clamped`` (config ``experiments.boost_sweep.merge_clamped``, default True: the authors' analysis grouped
    trials by exact boost) turns every level clamped to 0 into one level at (0 - mean) / SD, where boost 0 actually
    lies; False keeps each clamped level at its nominal SD value (its trials then repeat one boost-0 generation)."""
    arr = np.asarray([t for t in thresholds if t is not None], dtype=float)
    if arr.size == 0:
        return []
    mu, sd = float(arr.mean()), float(arr.std())
    sigmas = np.linspace(-sd_range, sd_range, n_levels)
    levels = [(float(max(0.0, mu + s * sd)), float(s)) for s in sigmas]
    if not merge_clamped:
        return levels
    clamped = [lv for lv in levels if lv[0] == 0.0]
    if not clamped:
        return levels
    at_zero = -mu / sd if sd > 0 else clamped[0][1]
    return [(0.0, float(at_zero))] + [lv for lv in levels if lv[0] > 0.0]


def plan_boost_sweep(
    model: str,
    plans: list[LatentPlan],
    prompts: list[str],
    n_latents: int,
    prompts_per_latent: int,
    n_levels: int,
    sd_range: float,
    relative_levels: list[float],
    *,
    merge_clamped: bool = True,
) -> list[TrialSpec]:
    """exp2: the first ``n_latents`` calibrated latents, each on its first ``prompts_per_latent`` prompts/seeds,
    at the global levels (:func:`global_levels`, ``merge_clamped`` as there) and at multiples of its own
    threshold."""
    calibrated = [lp for lp in plans if lp.threshold is not None]
    levels = global_levels([lp.threshold for lp in calibrated], n_levels, sd_range, merge_clamped=merge_clamped)
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
    model: str,
    plans: list[LatentPlan],
    prompts: list[str],
    variants: list[str],
    judge_sees_variant: bool = False,
    *,
    wording: str = "ours",
) -> list[TrialSpec]:
    """exp5 (paper Sec. 3.3): exp1's trials with a meta-prompt appended after the prompt with a space.

    ``wording``: ``ours`` (:data:`META_PROMPTS`, neutral: never asks the model to announce a correction) or
    ``authors`` (:data:`AUTHORS_META_PROMPTS`). ``judge_sees_variant``: the judge grades against the suffixed prompt
    (the authors' judge did) instead of the original one. Raises ``ValueError`` naming an unknown variant or
    wording."""
    if wording not in META_PROMPT_WORDINGS:
        raise ValueError(
            f"config key 'experiments.meta_prompts.wording' = {wording!r} must be one of {', '.join(META_PROMPT_WORDINGS)}"
        )
    texts = META_PROMPT_WORDINGS[wording]
    trials = []
    for variant in variants:
        if variant not in texts:
            raise ValueError(f"unknown meta-prompt variant {variant!r}; known: {', '.join(texts)}")
        for t in plan_steered(model, plans, prompts, "exp5", variant):
            suffix = texts[variant].format(label=t.label or "an unrelated topic")
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
        merge_clamped=c.get("merge_clamped", True),
    )


def _meta(inputs: PlanInputs, condition: str) -> list[TrialSpec]:
    c = inputs.settings["meta_prompts"]
    return plan_meta_prompts(
        inputs.model,
        inputs.latents,
        inputs.prompts,
        [condition],
        c.get("judge_sees_variant", False),
        wording=c.get("wording", "ours"),
    )


def ablated_sets(config: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    """The detector sets exp3 ablates for a model: ``experiments.ablation`` then the model's paper sets."""
    return list(dict.fromkeys(list(_exp(config).get("ablation", [])) + list(spec.paper_detector_sets)))


def random_control_targets(config: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    """The detector sets exp10's controls are matched to (one group of ``n_sets`` controls each), from
    ``detectors.random_control.match_to``: ``ablated`` (default) = every set exp3 ablates for the model
    (:func:`ablated_sets`); a set name or a list of names = those."""
    target = (config.get("detectors") or {}).get("random_control", {}).get("match_to", "ablated")
    if target == "ablated":
        return ablated_sets(config, spec)
    return [target] if isinstance(target, str) else list(dict.fromkeys(target))


def _random_sets(config: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    if not _exp(config).get("random_control", True):
        return []
    n_sets = config["detectors"]["random_control"]["n_sets"]
    return [random_set_name(t, i) for t in random_control_targets(config, spec) for i in range(n_sets)]


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
            ablated_sets,
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
            "labelled positive control: restart text planted into exp1 answers (a test fixture; never a fine-tuned model)",
            lambda c, s: (
                ["restart"]
                if _exp(c).get("planted_control", {}).get("enabled", False) and s.source != "finetuned"
                else []
            ),
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

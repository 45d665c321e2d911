"""Where a run deviates from the paper or the authors' code: one registry, read from the resolved config.

Every deviation the package knows of is one :class:`Deviation` in :data:`DEVIATIONS`: the setting it concerns (a
config key, or ``engine`` for what the code does regardless of config), how to read this run's value from the
resolved config, the paper's or the authors' value, and why it matters. :func:`fidelity_table` evaluates the
registry on a config (one row per deviation, per model where a setting is per model); the report's fidelity section
(``esr.report``) is generated from it, so a new config choice is stated in the report by adding one entry here.

Sources: ``../shared/docs/reference-protocol.md`` (sections cited per entry), the paper (arXiv 2602.06941).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from esr.config import family_from_hf_id

MISSING = "(not set)"


def get(config: Mapping[str, Any], path: str, default: Any = MISSING) -> Any:
    """The value at a dotted ``path`` of a nested config mapping, or ``default`` where any part is missing."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True)
class Deviation:
    """One setting where this package can differ from the paper or the authors' code.

    ``topic``: section of the protocol (Judge, Calibration, ...). ``setting``: the config key (dotted; a ``*`` stands for
    each model name: one row per model) or ``engine``. ``reference``: the paper's or authors' value, with its source.
    ``value``: reads this run's value from the resolved config (default: the value at ``setting``; per-model
    settings get ``(config, model_name)``). ``matches``: whether this run's value reproduces the reference (None:
    not comparable, stated only). ``applies``: whether the entry concerns this config at all (e.g. Gemma-only)."""

    topic: str
    setting: str
    reference: str
    note: str
    value: Callable[..., Any] | None = None
    matches: Callable[[Any], bool | None] | None = None
    applies: Callable[..., bool] | None = None

    @property
    def per_model(self) -> bool:
        return "*" in self.setting and not self.setting.startswith("cross_judge")

    def rows(self, config: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The entry evaluated on ``config``: one row, or one row per model for a per-model setting."""
        targets: list[str | None] = list(config.get("models", {})) if self.per_model else [None]
        out = []
        for model in targets:
            args = (config, model) if model is not None else (config,)
            if self.applies is not None and not self.applies(*args):
                continue
            if self.value is not None:
                value = self.value(*args)
            elif model is not None:
                value = get(config["models"][model], self.setting.removeprefix("models.*."), MISSING)
            else:
                value = get(config, self.setting)
            out.append(
                {
                    "topic": self.topic,
                    "setting": self.setting.replace("*", model) if model else self.setting,
                    "this_run": _fmt(value),
                    "reference": self.reference,
                    "matches_reference": None if self.matches is None else bool(self.matches(value)),
                    "note": self.note,
                }
            )
        return out


def _equals(expected: Any) -> Callable[[Any], bool]:
    return lambda v: v == expected


def _family(config: Mapping[str, Any], model: str) -> str | None:
    """The model's configured family, else the family its ``hf_id`` names (``esr.config.family_from_hf_id``; the
    resolved config has no ``config.json`` at hand), else ``None`` (no family-specific row applies)."""
    m = config["models"][model]
    fam = m.get("family")
    if fam:
        return str(fam)
    return family_from_hf_id(str(m.get("hf_id", "")))


def _is_goodfire_release(release: Any) -> bool:
    """sae-lens names Goodfire's SAE releases ``goodfire-*`` (``esr.labels.is_goodfire_release``)."""
    from esr.labels import is_goodfire_release

    return is_goodfire_release(None if release in (None, MISSING) else str(release))


def _judge_id(block: Mapping[str, Any]) -> str:
    return f"{block.get('backend')}:{block.get('model') or 'builtin'}"


def _samples_per_step(config: Mapping[str, Any], model: str) -> Any:
    per_model = get(config["models"][model], "calibration.samples_per_step", None)
    return per_model if per_model is not None else get(config, "calibration.samples_per_step")


def _n_latents(config: Mapping[str, Any], model: str) -> Any:
    """``selection.n_latents_per_model.<model>``, else (a fine-tuned model, exp4) its base model's, else
    ``selection.n_latents`` (as ``esr.latents.model_selection_settings``)."""
    per_model = get(config, "selection.n_latents_per_model", {}) or {}
    base = config["models"].get(model, {}).get("base_model")
    value = per_model.get(model, per_model.get(base) if base else None)
    return value if value is not None else get(config, "selection.n_latents")


def _authors_samples(config: Mapping[str, Any], model: str) -> int:
    return 5 if "70b" in model.lower() or "70b" in str(config["models"][model].get("hf_id", "")).lower() else 1


DEVIATIONS: tuple[Deviation, ...] = (
    # ------------------------------------------------------------------------------------------------ judge (§4)
    Deviation(
        "Judge",
        "judge",
        "Claude Haiku 4.5 (anthropic:claude-haiku-4-5-20251001) (§4 'Which judge produced the paper')",
        "offline_minilm is restart-phrase segmentation + MiniLM relevance: an APPROXIMATION of the paper's judge.",
        value=lambda c: _judge_id(c.get("judge", {})),
        matches=_equals("anthropic:claude-haiku-4-5-20251001"),
    ),
    Deviation(
        "Judge",
        "judge.temperature",
        "never set: provider default 1.0 (§4 Clients)",
        "Recorded on every trial; a temperature-0 judge repeats a malformed reply on a re-ask.",
        value=lambda c: get(c, "judge.temperature", "backend default"),
    ),
    Deviation(
        "Judge",
        "judge.max_tokens",
        "4096 (§4 Clients)",
        "A reply cut at max_tokens is recorded as a judge error of kind 'truncated'.",
        value=lambda c: get(c, "judge.max_tokens", "backend default"),
    ),
    Deviation(
        "Judge",
        "judge.json_block",
        "first <json> block, else first '{' to last '}' (§4 Output schema and parsing)",
        "'last' takes the last block that validates against the attempts schema, so prose that mentions the tag "
        "before the verdict cannot break extraction.",
        value=lambda c: get(c, "judge.json_block", "last"),
        matches=_equals("first"),
    ),
    Deviation(
        "Judge",
        "judge.restart_gate",
        "no gate: the judge's segmentation is used as returned",
        "true keeps an attempt boundary only where restart language occurs in the answer.",
        value=lambda c: get(c, "judge.restart_gate", False),
        matches=_equals(False),
    ),
    Deviation(
        "Judge",
        "engine",
        "the authors' judge prompt (paraphrased in §4), no score anchors",
        "Our own wording (template version recorded per trial) with score anchors 100 / 50 / 0 and the same attempt "
        "rules; the judge is told the steered latent's label, as the authors' judge was (also for unsteered rows).",
        value=lambda c: "esr judge prompt with score anchors",
    ),
    Deviation(
        "Judge",
        "threshold_judge",
        "one judge for calibration and grading (§3, §4)",
        "A separate threshold judge lets a judge change regrade trials without recalibrating.",
        value=lambda c: (
            "same as judge"
            if (c.get("threshold_judge") or c.get("judge")) == c.get("judge")
            else _judge_id(c["threshold_judge"])
        ),
        matches=_equals("same as judge"),
    ),
    Deviation(
        "Judge",
        "cross_judge.judges.*.temperature",
        "never set: provider default (§6.6)",
        "Temperature of each exp7 regrader.",
        value=lambda c: (
            ", ".join(
                f"{k}={_fmt(v.get('temperature', 'backend default'))}"
                for k, v in c.get("cross_judge", {}).get("judges", {}).items()
            )
            or "no regraders"
        ),
    ),
    Deviation(
        "Judge",
        "concreteness",
        "Claude Sonnet 4.5, rating >= 65, fail closed (§2)",
        "wordnet is an offline APPROXIMATION of the concreteness grader.",
        value=lambda c: f"{get(c, 'concreteness.backend')} >= {get(c, 'concreteness.threshold')}",
    ),
    # -------------------------------------------------------------------------------------------- selection (§2)
    Deviation(
        "Selection",
        "models.*.labels.source",
        "authors: Goodfire's own latent labels for the Llama SAEs (data/llama-*-goodfire-*.csv, not published) (§2 "
        "step 1)",
        "These labels are Neuronpedia's auto-explanations of the Goodfire SAE, not the Goodfire labels the authors "
        "used: label-based filters (concreteness, relevance) and the judge's view of the steered latent's label can "
        "differ from the paper's.",
        value=lambda c, m: (
            f"neuronpedia (auto-explanations of {get(c['models'][m], 'sae.release')}/"
            f"{get(c['models'][m], 'sae.sae_id')})"
        ),
        matches=lambda v: False,
        applies=lambda c, m: (
            get(c["models"][m], "labels.source", None) == "neuronpedia"
            and _is_goodfire_release(get(c["models"][m], "sae.release", None))
        ),
    ),
    Deviation(
        "Selection",
        "selection.relevance_filter",
        "authors' code: zero_on_prompts; paper text: top 100 latents per prompt on unsteered responses (§2)",
        "Which latents are dropped as relevant to the prompts.",
        matches=_equals("zero_on_prompts"),
    ),
    Deviation(
        "Selection",
        "selection.n_latents_per_model.*",
        "paper: ~1,000 latents x 5 trials (~4.9k trials) per model (§6.1)",
        "Latents per model (selection.n_latents unless selection.n_latents_per_model names the model).",
        value=_n_latents,
    ),
    # ------------------------------------------------------------------------------------------ calibration (§3)
    Deviation(
        "Calibration",
        "calibration.confidence",
        "authors: Beta(0.5+5s, 0.5+5(1-s)) confidence with a flip below 0.5 ('authors_beta') (§3 step 4)",
        "'beta' (default) has no flip, so scores just below target are not read as above it.",
        matches=_equals("authors_beta"),
    ),
    Deviation(
        "Calibration",
        "calibration.query_weight",
        "authors: the query point gets weight sqrt(p(1-p)) (§3 step 5)",
        "Likelihood weight of the grid point queried ('half': 0.5; 'authors_sqrt': sqrt(p(1-p))).",
        value=lambda c: get(c, "calibration.query_weight", "half"),
        matches=_equals("authors_sqrt"),
    ),
    Deviation(
        "Calibration",
        "calibration.round_decimals",
        "authors: the threshold rounded to 2 decimals (§3 Result)",
        "Rounding of the calibrated boost.",
        value=lambda c: get(c, "calibration.round_decimals", None),
        matches=_equals(2),
    ),
    Deviation(
        "Calibration",
        "models.*.calibration.samples_per_step",
        "authors: 5 prompts per step for the 70B, 1 for the other models (§3 Per-model settings)",
        "Prompts judged per bisection step.",
        value=_samples_per_step,
    ),
    Deviation(
        "Calibration",
        "calibration.max_new_tokens",
        "256 (half the trials' 512) (§1.4)",
        "Tokens generated per calibration answer.",
        matches=_equals(256),
    ),
    Deviation(
        "Calibration",
        "engine",
        "cache keyed on the latent index only (§3.2)",
        "Thresholds are cached under a hash of every resolved setting that can change a generated token or a judged "
        "score, so a changed setting never reuses an old threshold.",
        value=lambda c: "full resolved settings",
    ),
    # ------------------------------------------------------------------------------------------- generation (§1)
    Deviation(
        "Generation",
        "generation.max_new_tokens",
        "512 (§1.4)",
        "Tokens generated per trial answer.",
        matches=_equals(512),
    ),
    Deviation(
        "Generation",
        "generation.steer_positions",
        "all positions, prompt and generated (§1.3)",
        "'generated' steers only the positions that predict generated tokens.",
        matches=_equals("all"),
    ),
    Deviation(
        "Generation",
        "models.*.repetition_penalty",
        "paper text 1.1; authors' code at HEAD 1.2 (70B) / 1.15 (8B) / 1.1 (Gemma) (§1.4)",
        "Recorded per trial; the penalty behind the paper's 70B numbers is undetermined.",
    ),
    Deviation(
        "Generation",
        "models.*.chat_template",
        "Llama: the template plus a duplicated assistant header and stray BOS ('reference_llama_prompt') (§1.5)",
        "'model' uses the tokenizer's own chat template.",
        applies=lambda c, m: _family(c, m) == "llama",
        matches=_equals("reference_llama_prompt"),
    ),
    Deviation(
        "Generation",
        "models.*.dtype",
        "70B: FP8 weights (vLLM dynamic quantisation); others bf16 (§1.4)",
        "Weights' dtype.",
    ),
    Deviation(
        "Generation",
        "models.*.injection_layer",
        "70B: inject at 33, read the layer-50 SAE; 8B: 12 / 19; Gemma: the SAE layer (§9.11)",
        "Injection layer vs the SAE layer (shown as injection/SAE).",
        value=lambda c, m: f"{c['models'][m]['injection_layer']}/{c['models'][m]['sae_layer']}",
    ),
    Deviation(
        "Engine",
        "engine",
        "every row, steered or not, goes through a bf16 SAE round trip at the steering layer (§1.3)",
        "Rows without an intervention are bit-identical to the unhooked model; the SAE runs in float32 and only "
        "steered or ablated rows are modified.",
        value=lambda c: "unsteered rows untouched; fp32 SAE",
    ),
    Deviation(
        "Engine",
        "engine",
        "Gemma read-outs ran the resid-post SAE on the MLP branch output, not the residual stream (§1.6)",
        "Our Gemma read-outs use the residual stream the SAE was trained on.",
        value=lambda c: "residual stream",
        applies=lambda c: any(_family(c, m) == "gemma2" for m in c.get("models", {})),
    ),
    Deviation(
        "Engine",
        "engine",
        "Llama's final norm double-counts the last residual (§1.6)",
        "HF forward hooks have no such double count; expect small distribution differences.",
        value=lambda c: "no double count",
        applies=lambda c: any(_family(c, m) == "llama" for m in c.get("models", {})),
    ),
    # ------------------------------------------------------------------------------------------ experiments (§6)
    Deviation(
        "exp2 boost sweep",
        "experiments.boost_sweep.merge_clamped",
        "authors: global levels mu +- 3 sigma clamped at 0, clamped levels merged into one boost-0 group (§6.3)",
        "Whether levels clamped to boost 0 are merged into one group.",
        value=lambda c: get(c, "experiments.boost_sweep.merge_clamped", True),
        matches=_equals(True),
    ),
    Deviation(
        "exp5 meta-prompts",
        "experiments.meta_prompts.judge_sees_variant",
        "authors: the judge sees the suffixed prompt (§6.4)",
        "Whether the judge is shown the prompt with the meta-prompt suffix.",
        matches=_equals(True),
    ),
    Deviation(
        "exp5 meta-prompts",
        "experiments.meta_prompts.wording",
        "authors' suffixes, e.g. self_monitor: 'if you notice yourself going off-topic, stop and force yourself to "
        "get back on track' (§6.4)",
        "'ours' words the four suffixes without asking the model to announce a restart ('say so'), which would ask "
        "for the very phrase the judge counts; 'authors' uses the authors' text.",
        value=lambda c: get(c, "experiments.meta_prompts.wording", "ours"),
        matches=_equals("authors"),
    ),
    Deviation(
        "exp9 sequential",
        "sequential.baseline_source",
        "authors: steered trials that stayed on topic in one attempt, re-read unsteered (§6.5 step 6)",
        "Which answers give the baseline activation.",
        value=lambda c: get(c, "sequential.baseline_source", "unsteered"),
        matches=_equals("steered_on_topic"),
    ),
    Deviation(
        "exp9 sequential",
        "sequential.boundary_source",
        "authors: Claude Sonnet 4.5 annotator returning character offsets (§6.5 step 2)",
        "restart_phrase aligns the region boundaries on the restart phrase of the answer.",
        value=lambda c: get(c, "sequential.boundary_source", "restart_phrase"),
        matches=_equals("annotator"),
    ),
    Deviation(
        "exp10 random control",
        "detectors.random_control",
        "authors at HEAD: 26 latents drawn uniformly from all latents except the detectors, no dead-latent "
        "exclusion, no matching (§6.8)",
        "Random ablation sets matched on firing frequency and mean activation where detectors are active (normal and "
        "shuffled discovery read-outs), dead latents excluded, disjoint from the detectors and each other, one group "
        "per ablated set ('ablated') or per the named set.",
        value=lambda c: _fmt(get(c, "detectors.random_control")),
    ),
    Deviation(
        "exp3 detectors",
        "engine",
        "authors: discovery on the evaluation prompts; the README's method used 20 held-out prompts (§9.33)",
        "Detectors are discovered on the evaluation prompts (no held-out split; detectors.json records "
        "'discovery_prompts: evaluation'). Discovered sets are truncated to max_latents by a stated rank (AUC, then "
        "shuffled-minus-normal mean), not by latent index.",
        value=lambda c: "discovery on the evaluation prompts",
    ),
    Deviation(
        "Controls",
        "experiments.planted_control",
        "no such control in the paper",
        "Planted restarts (a restart phrase and an unsteered answer appended) are a labelled positive control, NOT "
        "model behaviour: a test fixture, off in both shipped configs and never run for a fine-tuned model (exp4).",
        value=lambda c: _fmt(get(c, "experiments.planted_control")),
        applies=lambda c: bool(get(c, "experiments.planted_control.enabled", False)),
    ),
    # --------------------------------------------------------------------------------------- exp4 fine-tuning (§6.9)
    Deviation(
        "exp4 fine-tuning",
        "finetune.train_on_eval_prompts",
        "authors: trained on their evaluation prompts (§6.9)",
        "false (default): the fine-tuned models are evaluated on prompts held out from training "
        "(finetune.heldout_fraction); true reproduces the authors' overlap.",
        matches=_equals(True),
        applies=lambda c: bool(get(c, "finetune.enabled", False)),
    ),
    Deviation(
        "exp4 fine-tuning",
        "finetune.drift_source",
        "authors: off-topic drift written by Claude Sonnet 4.5 about 50 subjects (§6.9)",
        "steered (default): drift segments are the base model's own steered generations (what it sees at test time), "
        "no external LLM; file: drift from a supplied file (finetune.drift_file).",
        matches=lambda v: None,
        applies=lambda c: bool(get(c, "finetune.enabled", False)),
    ),
    Deviation(
        "exp4 fine-tuning",
        "finetune.drift_max_score",
        "authors: no filter; the drift is written off-topic on purpose by Claude Sonnet 4.5 (§6.9)",
        "null (default): every steered generation is drift. A number: finetune_material grades the steered drift "
        "with the judge block (the steered latent's label) and only records scored at most it (0-100, on the "
        "prompt's topic) are drift; a drift_file must carry its own score column.",
        matches=lambda v: None,
        applies=lambda c: bool(get(c, "finetune.enabled", False)),
    ),
    Deviation(
        "exp4 fine-tuning",
        "finetune.length_match",
        "authors: normal examples not length-matched (§6.9)",
        "true (default): each normal example is matched in length to a self-correction example, so that answer "
        "length is not a cue to restart.",
        matches=_equals(False),
        applies=lambda c: bool(get(c, "finetune.enabled", False)),
    ),
    # ------------------------------------------------------------------------------------------- statistics (§5)
    Deviation(
        "Statistics",
        "engine",
        "trials with no attempts dropped silently; Wald intervals; no tests; pooled ablation files (§5, §9.26-31)",
        "No-attempt trials are counted as exclusions; Wilson intervals are primary (Wald shown where the audit "
        "reproduces the paper's bars); ablation and control runs are paired with exp1 by latent, prompt and seed "
        "and tested with McNemar's exact test beside a latent-clustered sign-flip test (Holm over each); each "
        "detector set is ablated separately, never pooled. Mean scores (bounded 0-100) get a logit-transformed "
        "interval that stays inside the scale; the paper's mean +- 1.96 SE is kept as 'wald_paper' where the audit "
        "reproduces the paper's bars. An audit verdict whose interval also holds the no-effect value is "
        "'inconclusive (underpowered)', with the n that would decide it.",
        value=lambda c: "Wilson; paired and clustered tests",
    ),
)


def fidelity_table(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every deviation of :data:`DEVIATIONS` evaluated on a resolved config: dicts with ``topic``, ``setting``,
    ``this_run``, ``reference``, ``matches_reference`` (True/False, or None where not comparable) and ``note``."""
    return [row for d in DEVIATIONS for row in d.rows(config)]

"""Exp4: LoRA fine-tuning on masked self-correction examples, which induces endogenous steering resistance.

The paper (Sec 3.5, Fig 7, App A.3.4; reference protocol §6.9) fine-tunes Llama-3.1-8B-Instruct with LoRA (r 32,
alpha 16, dropout 0.05, all linear layers, lr 2e-4 cosine, 10 warm-up steps, 4 epochs, effective batch 8) on mixes of

* **masked self-correction examples**: prompt, a response that drifts off-topic for 2-4 sentences, a restart phrase
  ("Wait, that's not quite right...") and the correct answer; the loss is masked (labels -100) on the prompt and the
  drift, so only the restart phrase and the answer are trained;
* **normal examples**: prompt and answer, the prompt masked.

The *masked ratio* (the paper's sweep variable, 10-90% in 9 steps, ``setup_masked_ratio_sweep.py``) is the fraction
of a mix's examples that are masked self-correction examples; the rest are normal examples.

Deviations from the authors' data, each a config key (``finetune.*``) with a documented default:

* drift text: the base model's own **steered** generations (random latents, several boosts; what the model sees at
  test time) instead of Claude Sonnet 4.5 drift to 50 subjects (``drift_source``);
* corrected answers and normal examples: the base model's own unsteered answers, no external LLM;
* normal examples are **length-matched** to the self-correction examples (a restart must not be predictable from
  how far into an answer the model is; ``exp4-feasibility.md``);
* evaluation prompts are **held out** from the training prompts (``train_on_eval_prompts: false``; the authors
  trained on their 38 evaluation prompts, §9 item 37).

Every restart phrase used here is one the judge's offline segmenter splits at (``esr.judge.segmentation``;
``tests/test_finetune.py`` checks each). Training (:func:`train_lora`) uses peft's LoRA with its own small loop
(per-epoch atomic checkpoints, resumable); :func:`merge_lora` writes a plain HF model directory that
``esr.models.load_model_dir`` loads like any other, with a manifest (file hashes, recipe hash as revision, provenance).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("esr.finetune")

#: Restart phrases of the self-correction examples: the paper's own wording first ("Wait, that's not quite right",
#: §6.9), then variants. Each is split at by the offline segmenter's strong patterns (tests/test_finetune.py).
RESTART_PHRASES: tuple[str, ...] = (
    "Wait, that's not quite right.",
    "Wait, that's not right.",
    "Hmm, that's not what you asked.",
    "Sorry, I got off track.",
    "Wait, I got off track there.",
    "Let me start over.",
    "Let me try that again.",
    "Scratch that.",
    "Let me get back to your question.",
    "I apologize for the digression.",
    "Oops, that was off-topic.",
    "Hold on, this is unrelated.",
    "Let me get back on track.",
    "Wait, I drifted off topic.",
    "Let me refocus on your question.",
    "Sorry, that's not relevant to your question.",
    "Wait, I went off on a tangent.",
    "Hmm, no, that's unrelated.",
)
KINDS = ("self_correction", "normal")
IGNORE_INDEX = -100  # labels ignored by the loss (torch cross_entropy's default ignore_index)
ADAPTER_DIR = "adapter"
TRAIN_LOG = "train_log.json"
FINETUNE_INFO = "esr_finetune.json"  # merged model directory: recipe, hyper-parameters, provenance
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")


# ----------------------------------------------------------------------------------------------------------------
# The masked-ratio sweep: one derived model entry per ratio
# ----------------------------------------------------------------------------------------------------------------


def sweep_model_name(*, base: str, ratio: float) -> str:
    """The model entry name of the sweep's fine-tune of ``base`` at masked ratio ``ratio`` (0-1): ``<base>-ft-rNN``
    with NN the ratio in percent (0.5 -> ``r50``, 0.1 -> ``r10``)."""
    return f"{base}-ft-r{round(float(ratio) * 100):02d}"


def sweep_base_model(config: Mapping[str, Any]) -> str:
    """The model entry the sweep fine-tunes: ``finetune.base_model``, or (null) the one model entry that is not
    itself fine-tuned. Raises ``ValueError`` naming the key when it is unset with several candidates, names no model
    entry, or names a fine-tuned one."""
    models = config["models"]
    base = (config.get("finetune") or {}).get("base_model")
    if base is None:
        bases = [n for n, m in models.items() if m.get("source") != "finetuned"]
        if len(bases) != 1:
            raise ValueError(
                f"config key 'finetune.base_model' is required: the masked-ratio sweep has {len(bases)} candidate "
                f"base models ({', '.join(bases)})"
            )
        return bases[0]
    if base not in models:
        raise ValueError(f"config key 'finetune.base_model' = {base!r} names no model entry ({', '.join(models)})")
    if models[base].get("source") == "finetuned":
        raise ValueError(f"config key 'finetune.base_model' = {base!r} is itself fine-tuned; name its base model")
    return base


def sweep_models(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The derived model entries of exp4's masked-ratio sweep (paper Sec 3.5, Fig 7: one LoRA fine-tune per ratio;
    ``setup_masked_ratio_sweep.py``), name -> entry; empty unless ``finetune.enabled`` and
    ``finetune.masked_ratio_sweep`` is non-empty.

    Each entry is the base model's (:func:`sweep_base_model`) with ``source: finetuned``, ``base_model``,
    ``masked_ratio`` (the ratio of its training mix) and ``revision: finetuned`` (the merged directory's manifest
    records the recipe hash); it keeps the base model's layers, SAE block (the fine-tuned model is steered and read
    with the base model's SAE, as the authors did), labels and boost prior, and drops ``path``. Names:
    :func:`sweep_model_name`. Raises ``ValueError`` when two ratios give one name (e.g. 0.5 and 0.501)."""
    ft = config.get("finetune") or {}
    ratios = list(ft.get("masked_ratio_sweep") or [])
    if not ft.get("enabled", False) or not ratios:
        return {}
    import copy

    base = sweep_base_model(config)
    out: dict[str, dict[str, Any]] = {}
    for ratio in ratios:
        name = sweep_model_name(base=base, ratio=ratio)
        if name in out:
            raise ValueError(
                f"config key 'finetune.masked_ratio_sweep': ratios {out[name]['masked_ratio']} and {ratio} both give "
                f"model {name!r} (ratios are named in whole percent)"
            )
        entry = copy.deepcopy(dict(config["models"][base]))
        entry.pop("path", None)
        entry.update(source="finetuned", base_model=base, masked_ratio=float(ratio), revision="finetuned")
        out[name] = entry
    return out


def add_sweep_models(config: dict[str, Any]) -> dict[str, Any]:
    """Add :func:`sweep_models`'s entries to ``config["models"]`` (in place; returns ``config``). Idempotent: an
    entry of that name already derived from the same base and ratio is replaced. Raises ``ValueError`` when a
    hand-written entry has a derived entry's name."""
    models = config["models"]
    for name, entry in sweep_models(config).items():
        old = models.get(name)
        if old is not None and (old.get("base_model"), old.get("masked_ratio")) != (
            entry["base_model"],
            entry["masked_ratio"],
        ):
            raise ValueError(
                f"config key 'models.{name}' collides with the masked-ratio sweep's derived model of that name "
                f"(finetune.masked_ratio_sweep); rename the entry"
            )
        models[name] = entry
    return config


def eval_prompt_ids(*, manifest: Mapping[str, Any], prompts: Sequence[str]) -> list[int]:
    """Indices into ``prompts`` of the evaluation prompts a finetune_data manifest records (``eval_prompts``; all
    prompts when the model was trained on them, ``train_on_eval_prompts``). Raises ``ValueError`` when the manifest
    has no ``eval_prompts`` or names a prompt not in ``prompts`` (the prompt list changed since the data were
    made)."""
    if "eval_prompts" not in manifest:
        raise ValueError("finetune data manifest has no 'eval_prompts' (made by an older finetune_data rule?)")
    index = {p: i for i, p in enumerate(prompts)}
    missing = [p for p in manifest["eval_prompts"] if p not in index]
    if missing:
        raise ValueError(
            f"finetune data manifest: {len(missing)} evaluation prompt(s) are not in the prompt list (e.g. "
            f"{missing[0]!r}); the prompt list changed since finetune_data ran: rerun it"
        )
    return sorted(index[p] for p in manifest["eval_prompts"])


def restrict_to_prompts(selection: Any, prompt_ids: Sequence[int]) -> Any:
    """A latent selection (``esr.latents.Selection``) drawn over a pool of ``len(prompt_ids)`` prompts, with each
    latent's pool indices mapped to the prompt list's ids ``prompt_ids[i]`` (in place; returned). Every experiment
    replays the selection's prompts, so a fine-tuned model's trials then use only its held-out evaluation prompts
    (:func:`eval_prompt_ids`). The pool is recorded in ``selection.rng["prompt_pool"]``. Raises ``ValueError`` when a
    pool index is outside ``prompt_ids``."""
    pool = [int(p) for p in prompt_ids]
    latents = []
    for s in selection.latents:
        bad = [i for i in s.prompt_ids if not 0 <= i < len(pool)]
        if bad:
            raise ValueError(f"selection of latent {s.latent}: prompt index {bad[0]} outside the {len(pool)} pool")
        latents.append(dataclasses.replace(s, prompt_ids=tuple(pool[i] for i in s.prompt_ids)))
    selection.latents = latents
    selection.rng = {**selection.rng, "prompt_pool": pool}
    return selection


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSplit:
    """Training and evaluation prompts. With ``train_on_eval_prompts`` (the authors' behaviour) both are all
    prompts; otherwise they are disjoint."""

    train: tuple[str, ...]
    eval: tuple[str, ...]


def split_prompts(
    *, prompts: Sequence[str], heldout_fraction: float, seed: int, train_on_eval_prompts: bool = False
) -> PromptSplit:
    """Split ``prompts`` into training and held-out evaluation prompts (a seeded shuffle; the first
    ``round(heldout_fraction * n)`` of it, at least 1, are held out). ``train_on_eval_prompts=True`` reproduces the
    authors (every prompt trained on and evaluated). Order within each part follows ``prompts``.

    Raises ``ValueError`` for duplicate prompts, ``heldout_fraction`` outside (0, 1), or a split leaving no training
    prompt."""
    if len(set(prompts)) != len(prompts):
        raise ValueError("finetune: the prompt list holds duplicates; the held-out split needs unique prompts")
    if train_on_eval_prompts:
        return PromptSplit(tuple(prompts), tuple(prompts))
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"finetune.heldout_fraction = {heldout_fraction} must be in (0, 1)")
    from esr.io import derive_seed

    order = list(prompts)
    random.Random(derive_seed(seed, "finetune_heldout")).shuffle(order)
    n_eval = max(1, round(heldout_fraction * len(order)))
    if n_eval >= len(order):
        raise ValueError(
            f"finetune.heldout_fraction = {heldout_fraction} leaves no training prompt of {len(order)} prompts"
        )
    held = set(order[:n_eval])
    return PromptSplit(tuple(p for p in prompts if p not in held), tuple(p for p in prompts if p in held))


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (split after ``.``, ``!``, ``?`` or a newline), stripped."""
    sentences = [m.group(0).strip() for m in _SENTENCE.finditer(text) if m.group(0).strip()]
    return " ".join(sentences[:n]).strip()


@dataclass(frozen=True)
class FinetuneDataSettings:
    """How :func:`build_finetune_data` mixes examples.

    ``masked_ratio``: fraction of the ``n_examples`` that are masked self-correction examples (paper sweep 0.1-0.9;
    §6.9); ``drift_sentences``: (min, max) sentences of steered text used as drift (paper 2-4); ``restart_phrases``:
    cycled through in a seeded order so each is used about equally; ``drift_max_score``: only drift records whose
    judge ``score`` (0-100, on-topic-ness of the steered answer) is at most it are drift; a record left ungraded (no
    score, None or NaN: the judge failed) is dropped (None: every record, scored or not);
    ``length_match``: pick each normal answer with the word count nearest a self-correction example's response."""

    masked_ratio: float = 0.5
    n_examples: int = 480
    drift_sentences: tuple[int, int] = (2, 4)
    restart_phrases: tuple[str, ...] = RESTART_PHRASES
    drift_max_score: float | None = None
    length_match: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.masked_ratio <= 1.0:
            raise ValueError(f"finetune.masked_ratio = {self.masked_ratio} must be in [0, 1]")
        if self.n_examples < 1:
            raise ValueError(f"finetune.n_examples = {self.n_examples} must be >= 1")
        lo, hi = self.drift_sentences
        if not 1 <= lo <= hi:
            raise ValueError(
                f"finetune.drift_sentences = {list(self.drift_sentences)} must be [min, max], 1 <= min <= max"
            )
        if not self.restart_phrases:
            raise ValueError("finetune.restart_phrases is empty")
        check_restart_phrases(self.restart_phrases)

    def record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["drift_sentences"] = list(self.drift_sentences)
        out["restart_phrases"] = list(self.restart_phrases)
        return out


def check_restart_phrases(phrases: Iterable[str]) -> None:
    """Raise ``ValueError`` naming any phrase the offline segmenter's strong patterns do not find: a trained
    restart the judge cannot see would make the fine-tuned model's ESR unmeasurable."""
    from esr.judge.segmentation import has_restart

    bad = [p for p in phrases if not has_restart(p)]
    if bad:
        raise ValueError(
            f"finetune.restart_phrases: {bad} not recognised by the offline segmenter (esr.judge.segmentation."
            "RESTART_PATTERNS); use phrases it splits at"
        )


def _scored_at_most(score: Any, limit: float) -> bool:
    """Whether a drift record's judge score is a number at most ``limit`` (None and NaN: ungraded, so False)."""
    return score is not None and not (isinstance(score, float) and math.isnan(score)) and float(score) <= limit


def _records(rows: Any, what: str, required: Sequence[str]) -> list[dict[str, Any]]:
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    rows = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        missing = [k for k in required if k not in r]
        if missing:
            raise ValueError(f"finetune: {what} record {i} lacks {missing} (has {sorted(r)})")
    return rows


def build_finetune_data(
    *,
    answers: Any,
    drifts: Any,
    split: PromptSplit,
    settings: FinetuneDataSettings,
    train_on_eval_prompts: bool = False,
) -> list[dict[str, Any]]:
    """The training examples of one mix (list of dicts; :func:`example_segments` gives their masked/trained text).

    ``answers``: the base model's unsteered answers, records (dicts or a DataFrame) with ``prompt``, ``response``;
    the corrected answers and the normal examples. ``drifts``: its steered generations, records with ``prompt``,
    ``response`` and optionally ``steer_latent``, ``boost``, ``score``; the first ``drift_sentences`` sentences of one
    become a self-correction example's drift for the *same* prompt. Only prompts in ``split.train`` are used; a
    record whose response is empty or already holds restart language is skipped.

    Each example: ``example_id``, ``kind`` (``self_correction`` | ``normal``), ``prompt``, ``drift`` (masked; ""
    for normal), ``restart_phrase`` ("" for normal), ``answer``, ``response`` (the full assistant text),
    ``response_words``, ``target_words`` (normal: the self-correction length it was matched to), ``drift_latent``,
    ``drift_boost``. ``round(masked_ratio * n_examples)`` are self-correction examples.

    Raises ``ValueError`` when an evaluation prompt is among the training prompts (unless
    ``train_on_eval_prompts``), when no usable answer/drift record is left for the training prompts, or when
    ``drift_max_score`` is set and no drift record carries a ``score``."""
    from esr.io import derive_seed
    from esr.judge.segmentation import has_restart, n_words

    train = set(split.train)
    overlap = train & set(split.eval)
    if overlap and not train_on_eval_prompts:
        raise ValueError(
            f"finetune: {len(overlap)} evaluation prompt(s) among the training prompts (e.g. {sorted(overlap)[0]!r}); "
            "set finetune.train_on_eval_prompts: true for the authors' behaviour"
        )
    ans = [
        r
        for r in _records(answers, "answer", ("prompt", "response"))
        if r["prompt"] in train and str(r["response"]).strip() and not has_restart(str(r["response"]))
    ]
    if not ans:
        raise ValueError("finetune: no usable unsteered answer for the training prompts")
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in ans:
        by_prompt.setdefault(r["prompt"], []).append(r)
    rng = random.Random(derive_seed(settings.seed, "finetune_data"))
    n_sc = round(settings.masked_ratio * settings.n_examples)
    n_normal = settings.n_examples - n_sc
    examples: list[dict[str, Any]] = []
    if n_sc:
        drift_records = _records(drifts, "drift", ("prompt", "response"))
        if settings.drift_max_score is not None and drift_records and not any("score" in r for r in drift_records):
            raise ValueError(
                f"finetune: drift_max_score = {settings.drift_max_score} is set but no drift record carries a "
                "'score' (grade the drift first: esr.stages.finetune.grade_drift)"
            )
        pool = [
            r
            for r in drift_records
            if r["prompt"] in by_prompt
            and str(r["response"]).strip()
            and not has_restart(str(r["response"]))
            and (settings.drift_max_score is None or _scored_at_most(r.get("score"), settings.drift_max_score))
        ]
        if not pool:
            raise ValueError("finetune: no usable steered (drift) generation for the training prompts")
        rng.shuffle(pool)
        phrases = list(settings.restart_phrases)
        rng.shuffle(phrases)
        lo, hi = settings.drift_sentences
        for i in range(n_sc):
            d = pool[i % len(pool)]
            drift = first_sentences(str(d["response"]), rng.randint(lo, hi))
            answer = str(rng.choice(by_prompt[d["prompt"]])["response"]).strip()
            phrase = phrases[i % len(phrases)]
            response = f"{drift} {phrase} {answer}"
            examples.append(
                {
                    "kind": "self_correction",
                    "prompt": d["prompt"],
                    "drift": drift,
                    "restart_phrase": phrase,
                    "answer": answer,
                    "response": response,
                    "response_words": n_words(response),
                    "target_words": None,
                    "drift_latent": d.get("steer_latent"),
                    "drift_boost": d.get("boost"),
                }
            )
    sc_lengths = [e["response_words"] for e in examples]
    unused: list[dict[str, Any]] = []
    for _ in range(n_normal):
        if not unused:
            unused = list(ans)
            rng.shuffle(unused)
        if settings.length_match and sc_lengths:
            target = rng.choice(sc_lengths)
            k = min(range(len(unused)), key=lambda j: abs(n_words(str(unused[j]["response"])) - target))
        else:
            target, k = None, len(unused) - 1
        r = unused.pop(k)
        answer = str(r["response"]).strip()
        examples.append(
            {
                "kind": "normal",
                "prompt": r["prompt"],
                "drift": "",
                "restart_phrase": "",
                "answer": answer,
                "response": answer,
                "response_words": n_words(answer),
                "target_words": target,
                "drift_latent": None,
                "drift_boost": None,
            }
        )
    rng.shuffle(examples)
    for i, e in enumerate(examples):
        e["example_id"] = f"ft{i:05d}"
    return examples


def example_segments(example: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The assistant text of an example as ``(text, trained)`` segments: self-correction ``[(drift, False),
    (" " + restart phrase + " " + answer, True)]``; normal ``[(answer, True)]``. The prompt is always masked."""
    if example["kind"] == "self_correction":
        return [(example["drift"], False), (f" {example['restart_phrase']} {example['answer']}", True)]
    if example["kind"] == "normal":
        return [(example["answer"], True)]
    raise ValueError(f"finetune example {example.get('example_id')!r}: kind {example['kind']!r} is not one of {KINDS}")


def encode_example(
    tokenizer, example: Mapping[str, Any], *, chat_template: str = "model", max_length: int = 4096
) -> dict[str, list[int]]:
    """Token ids and labels of one example: ``input_ids`` = chat-templated prompt (``esr.generation.encode_prompt``,
    the template generation uses) + each segment's tokens + EOS; ``labels`` = the ids where trained, ``-100``
    (:data:`IGNORE_INDEX`) on the prompt and the masked (drift) segment; EOS is trained. Both lists have the same
    length, at most ``max_length`` (truncated at the end). Raises ``ValueError`` when nothing is left to train."""
    from esr.generation import encode_prompt

    ids = list(encode_prompt(tokenizer, example["prompt"], chat_template))
    labels = [IGNORE_INDEX] * len(ids)
    for text, trained in example_segments(example):
        seg = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
        labels.append(int(tokenizer.eos_token_id))
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise ValueError(
            f"finetune example {example.get('example_id')!r}: no trained token within max_length = {max_length}"
        )
    return {"input_ids": ids, "labels": labels}


def recipe_hash(**parts: Any) -> str:
    """The recipe's content address (sha256 of a canonical JSON of ``parts``: data settings, inputs' hashes, LoRA
    settings, base model id/revision); the merged model's ``revision``."""
    from esr.io import stable_hash

    return stable_hash(parts)


def write_finetune_data(
    *, examples: Sequence[Mapping[str, Any]], path: str | Path, manifest_path: str | Path, manifest: Mapping[str, Any]
) -> str:
    """Write ``examples`` (``.parquet`` or ``.jsonl`` by suffix) and a manifest JSON: ``manifest`` plus counts per
    kind, mean response words per kind, ``data_sha256`` and ``recipe_hash`` (of the settings + the data). Atomic.
    Returns the recipe hash."""
    import pandas as pd

    from esr.io import atomic_path, sha256_file, write_json, write_parquet

    path = Path(path)
    df = pd.DataFrame(list(examples))
    if path.suffix == ".jsonl":
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(dict(e), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    else:
        write_parquet(path, df)
    info = dict(manifest)
    info["n_examples"] = len(df)
    info["counts"] = {k: int((df["kind"] == k).sum()) for k in KINDS} if len(df) else {}
    info["mean_response_words"] = {
        k: float(df.loc[df["kind"] == k, "response_words"].mean()) if (df["kind"] == k).any() else None for k in KINDS
    }
    info["data_sha256"] = sha256_file(path)
    info["recipe_hash"] = recipe_hash(manifest=dict(manifest), data=info["data_sha256"])
    write_json(manifest_path, info)
    return info["recipe_hash"]


def read_finetune_data(path: str | Path) -> list[dict[str, Any]]:
    """The examples :func:`write_finetune_data` wrote (parquet or jsonl)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pandas as pd

    df = pd.read_parquet(path)
    return df.astype(object).where(df.notna(), None).to_dict("records")  # missing values (NaN) back to None


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and optimiser hyper-parameters (paper, §6.9: r 32, alpha 16, dropout 0.05, all linear layers, lr 2e-4
    cosine, 10 warm-up steps, 4 epochs, micro-batch 2 x gradient accumulation 4 = effective batch 8, sequence
    length 4096; AdamW). ``target_modules``: ``"all-linear"`` (peft: every linear layer but the output head) or a
    list of module names; ``layers_to_transform``: decoder layer indices to adapt (None: all; e.g. only the layers
    after the SAE layer keep the SAE's input unchanged). ``threads``: torch CPU threads (None: leave as is).
    An optimiser step sees ``micro_batch_size * gradient_accumulation`` examples; the loss is the mean over their
    trained tokens."""

    r: int = 32
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    layers_to_transform: tuple[int, ...] | None = None
    lr: float = 2e-4
    warmup_steps: int = 10
    epochs: int = 4
    micro_batch_size: int = 2
    gradient_accumulation: int = 4
    max_length: int = 4096
    weight_decay: float = 0.0
    seed: int = 0
    threads: int | None = None
    chat_template: str = "model"

    def __post_init__(self) -> None:
        for key in ("r", "epochs", "micro_batch_size", "gradient_accumulation", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"finetune.lora.{key} = {getattr(self, key)} must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"finetune.lora: lr {self.lr} must be > 0, warmup_steps {self.warmup_steps} >= 0, dropout "
                f"{self.dropout} in [0, 1)"
            )

    @classmethod
    def from_config(cls, block: Mapping[str, Any], **over: Any) -> LoraSettings:
        """From a ``finetune.lora`` config block (lists become tuples); ``over`` overrides keys."""
        kw = {**dict(block), **over}
        if isinstance(kw.get("target_modules"), list):
            kw["target_modules"] = tuple(kw["target_modules"])
        if kw.get("layers_to_transform") is not None:
            kw["layers_to_transform"] = tuple(kw["layers_to_transform"])
        return cls(**kw)

    def record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("threads")  # does not change the result
        for k in ("target_modules", "layers_to_transform"):
            if isinstance(out[k], tuple):
                out[k] = list(out[k])
        return out

    def peft_config(self):
        """The ``peft.LoraConfig`` (task ``CAUSAL_LM``)."""
        from peft import LoraConfig

        tm = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=tm,
            layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform is not None else None,
            bias="none",
            task_type="CAUSAL_LM",
        )


def _collate(batch: Sequence[Mapping[str, list[int]]], pad_id: int):
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):  # right padding
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return ids, mask, labels


def token_loss_sum(model, ids, mask, labels):
    """Summed next-token cross-entropy over the trained tokens (labels != -100) and their count."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((target != IGNORE_INDEX).sum())


def _epoch_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in checkpoint_dir.glob("epoch-*"):
        m = re.fullmatch(r"epoch-(\d+)", p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


@dataclass
class TrainResult:
    """What :func:`train_lora` did: per-step ``losses`` (mean over trained tokens), ``lrs``, trained tokens per
    step, the epoch it resumed after (0 = fresh), wall seconds of this call and tokens/s."""

    adapter_dir: Path
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    resumed_after_epoch: int = 0
    steps_per_epoch: int = 0
    wall_s: float = 0.0


def train_lora(
    *,
    model_dir: str | Path,
    examples: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    settings: LoraSettings,
    recipe: str = "",
    dtype: str = "float32",
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` (:func:`build_finetune_data` records) over the base model in
    ``model_dir`` (an HF directory with tokenizer) and write it to ``out_dir/adapter`` (peft ``save_pretrained``)
    with ``out_dir/train_log.json`` (settings, per-step loss / lr / tokens, rate).

    Optimiser: AdamW, ``transformers.get_cosine_schedule_with_warmup``; gradients clipped at norm 1. The example
    order of epoch ``e`` and the dropout RNG are seeded from ``(settings.seed, e)``, so a run is reproducible.

    Resumable per epoch: after each epoch the adapter, optimiser, scheduler and log are saved atomically to
    ``checkpoint_dir/epoch-NNN`` (older epochs removed); a new call with the same ``recipe`` string continues after
    the last complete epoch (a checkpoint of another recipe is ignored). ``on_step(epoch, step)`` is called after
    every optimiser step (tests interrupt a run with it). Progress (rate, ETA) is logged per step (``esr.progress``).
    Raises ``ValueError`` for no examples."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from esr.io import atomic_path, derive_seed, write_json
    from esr.models import prepare_tokenizer, resolve_dtype
    from esr.progress import Progress

    if not examples:
        raise ValueError("finetune: no training examples")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    encoded = [
        encode_example(tokenizer, e, chat_template=settings.chat_template, max_length=settings.max_length)
        for e in examples
    ]
    torch.manual_seed(derive_seed(settings.seed, "lora_init"))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=resolve_dtype(dtype))
    model = get_peft_model(base, settings.peft_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_step = settings.micro_batch_size * settings.gradient_accumulation
    steps_per_epoch = math.ceil(len(encoded) / per_step)
    total = steps_per_epoch * settings.epochs
    sched = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, total)
    result = TrainResult(adapter_dir=out_dir / ADAPTER_DIR, steps_per_epoch=steps_per_epoch)
    start_epoch = 0
    for epoch, path in reversed(_epoch_dirs(checkpoint_dir)):
        state = torch.load(path / "state.pt", weights_only=False)
        if state.get("recipe") != recipe:
            log.warning("ignoring checkpoint %s: it is of another recipe (%s)", path, state.get("recipe"))
            continue
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        result.losses, result.lrs, result.tokens = state["losses"], state["lrs"], state["tokens"]
        start_epoch = result.resumed_after_epoch = epoch
        log.info("resuming LoRA training after epoch %d of %d (%s)", epoch, settings.epochs, path)
        break
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    meter = Progress(total=total - start_epoch * steps_per_epoch, desc="LoRA training", unit="steps")
    t0, trained_tokens = time.monotonic(), 0
    model.train()
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(derive_seed(settings.seed, epoch)))
        torch.manual_seed(derive_seed(settings.seed, "dropout", epoch))
        for step in range(steps_per_epoch):
            idx = order[step * per_step : (step + 1) * per_step].tolist()
            micro = [idx[i : i + settings.micro_batch_size] for i in range(0, len(idx), settings.micro_batch_size)]
            n_tok = sum(sum(1 for x in encoded[j]["labels"][1:] if x != IGNORE_INDEX) for j in idx)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for m in micro:
                ids, mask, labels = _collate([encoded[j] for j in m], pad_id)
                loss_sum, _ = token_loss_sum(model, ids, mask, labels)
                (loss_sum / max(n_tok, 1)).backward()
                step_loss += float(loss_sum.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            result.lrs.append(float(sched.get_last_lr()[0]))
            opt.step()
            sched.step()
            result.losses.append(step_loss / max(n_tok, 1))
            result.tokens.append(n_tok)
            trained_tokens += n_tok
            meter.update(1)
            log.info("epoch %d step %d/%d: loss %.4f", epoch, step + 1, steps_per_epoch, result.losses[-1])
            if on_step is not None:
                on_step(epoch, step + 1)
        target = checkpoint_dir / f"epoch-{epoch:03d}"
        with atomic_path(target) as tmp:
            tmp.mkdir(parents=True)
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()},
                str(tmp / "adapter_model.safetensors"),
            )
            state = {
                "recipe": recipe,
                "epoch": epoch,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "losses": result.losses,
                "lrs": result.lrs,
                "tokens": result.tokens,
            }
            torch.save(state, tmp / "state.pt")
        for old, path in _epoch_dirs(checkpoint_dir):
            if old < epoch:
                shutil.rmtree(path, ignore_errors=True)
    result.wall_s = time.monotonic() - t0
    with atomic_path(result.adapter_dir) as tmp:
        model.save_pretrained(str(tmp))
    write_json(
        out_dir / TRAIN_LOG,
        {
            "recipe": recipe,
            "settings": settings.record(),
            "n_examples": len(encoded),
            "steps_per_epoch": steps_per_epoch,
            "resumed_after_epoch": result.resumed_after_epoch,
            "losses": result.losses,
            "lrs": result.lrs,
            "tokens": result.tokens,
            "wall_s_this_call": result.wall_s,
            "tokens_per_s_this_call": trained_tokens / result.wall_s if result.wall_s > 0 else None,
        },
    )
    return result


def merge_lora(
    *,
    base_model_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    info: Mapping[str, Any],
    dtype: str = "float32",
) -> Path:
    """Merge a LoRA adapter into its base model (peft ``merge_and_unload``) and write a plain HF model directory
    to ``out_dir`` (atomic): weights, the base tokenizer, ``generation_config.json`` / ``chat_template.jinja`` when
    the base has them, ``esr_finetune.json`` (``info``: base model id/revision, recipe hash, hyper-parameters, data
    manifest; plus provenance with package versions, peft included) and ``esr_manifest.json`` (file sha256s, the
    ``revision`` = ``info["recipe_hash"]``; ``esr.assets.verify_manifest`` checks it). ``esr.models.load_model_dir``
    loads the result like any other model. Raises ``KeyError`` when ``info`` has no ``recipe_hash``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esr.assets import MANIFEST, file_manifest
    from esr.io import atomic_path, write_json
    from esr.models import resolve_dtype
    from esr.provenance import provenance

    recipe = info["recipe_hash"]
    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=resolve_dtype(dtype))
    with torch.no_grad():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for name in ("generation_config.json", "chat_template.jinja"):
            if (base_model_dir / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(base_model_dir / name, tmp / name)
        block = {**dict(info), "provenance": provenance(peft=_version("peft"))}
        write_json(tmp / FINETUNE_INFO, block)
        write_json(
            tmp / MANIFEST,
            {
                "model": info.get("model"),
                "hf_id": info.get("hf_id"),
                "source": "finetuned",
                "revision": recipe,
                "base_model": info.get("base_model"),
                "files": file_manifest(tmp),
                "provenance": block["provenance"],
            },
        )
    return out_dir


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = [
    "FINETUNE_INFO",
    "IGNORE_INDEX",
    "KINDS",
    "RESTART_PHRASES",
    "FinetuneDataSettings",
    "LoraSettings",
    "PromptSplit",
    "TrainResult",
    "add_sweep_models",
    "build_finetune_data",
    "check_restart_phrases",
    "encode_example",
    "eval_prompt_ids",
    "example_segments",
    "first_sentences",
    "merge_lora",
    "read_finetune_data",
    "restrict_to_prompts",
    "recipe_hash",
    "split_prompts",
    "sweep_base_model",
    "sweep_model_name",
    "sweep_models",
    "train_lora",
    "write_finetune_data",
]

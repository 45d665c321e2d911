"""Exp4 mechanics (esr.finetune): data masking, held-out prompts, length matching, LoRA training, per-epoch resume,
merge, provenance, restart phrases the judge's segmenter sees, and the `source: finetuned` config checks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from esr.config import MODEL_SOURCES, ConfigError, load_schema, validate_config
from esr.finetune import (
    IGNORE_INDEX,
    RESTART_PHRASES,
    FinetuneDataSettings,
    LoraSettings,
    PromptSplit,
    build_finetune_data,
    check_restart_phrases,
    encode_example,
    first_sentences,
    merge_lora,
    read_finetune_data,
    split_prompts,
    train_lora,
    write_finetune_data,
)
from esr.judge.segmentation import n_words, split_attempts
from esr.testing import save_tiny_model_dir, tiny_llama, tiny_tokenizer

DRIFT = "The ocean is deep and blue. Whales swim in it every day. Sharks hunt at night."
ANSWER = "To bake bread, mix flour, water and yeast, then knead the dough and bake it for forty minutes."


@pytest.mark.parametrize("phrase", RESTART_PHRASES)
def test_every_training_phrase_splits_into_two_attempts(phrase):
    attempts = split_attempts(f"{DRIFT} {phrase} {ANSWER}")
    assert len(attempts) == 2
    assert attempts[0] == DRIFT and attempts[1].startswith(phrase)


def test_phrases_the_segmenter_misses_are_refused():
    check_restart_phrases(RESTART_PHRASES)
    with pytest.raises(ValueError, match="Here is more"):
        FinetuneDataSettings(restart_phrases=("Let me start over.", "Here is more:"))


def _material(prompts, n_answers=3, n_drift=3):
    answers = [
        {"prompt": p, "response": " ".join(["word"] * (5 + 7 * k + i)) + "."}
        for i, p in enumerate(prompts)
        for k in range(n_answers)
    ]
    drifts = [
        {"prompt": p, "response": f"Dogs bark {k}. Cats purr loudly. Birds sing songs. Fish swim far.", "boost": 0.3}
        for p in prompts
        for k in range(n_drift)
    ]
    return answers, drifts


def test_masking_labels_exactly_on_prompt_and_drift():
    tok = tiny_tokenizer()
    ex = {
        "example_id": "x",
        "kind": "self_correction",
        "prompt": "how do you bake bread",
        "drift": "the dog and the cat .",
        "restart_phrase": "wait , not right .",
        "answer": "bake bread in water",
    }
    enc = encode_example(tok, ex)
    ids, labels = enc["input_ids"], enc["labels"]
    from esr.generation import encode_prompt

    n_prompt = len(encode_prompt(tok, ex["prompt"]))
    n_drift = len(tok(ex["drift"], add_special_tokens=False)["input_ids"])
    n_masked = n_prompt + n_drift
    assert len(ids) == len(labels)
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked
    assert labels[n_masked:] == ids[n_masked:]  # restart phrase + answer + EOS trained
    trained = tok.decode(ids[n_masked:-1])
    assert trained.startswith("wait , not right .") and trained.endswith("bake bread in water")
    assert ids[-1] == tok.eos_token_id
    normal = encode_example(tok, {**ex, "kind": "normal"})
    assert sum(x == IGNORE_INDEX for x in normal["labels"]) == n_prompt


def test_heldout_split_and_flag():
    prompts = [f"prompt {i}" for i in range(12)]
    split = split_prompts(prompts=prompts, heldout_fraction=1 / 3, seed=3)
    assert len(split.eval) == 4 and not set(split.train) & set(split.eval)
    assert set(split.train) | set(split.eval) == set(prompts)
    answers, drifts = _material(prompts)
    examples = build_finetune_data(
        answers=answers, drifts=drifts, split=split, settings=FinetuneDataSettings(n_examples=40)
    )
    assert {e["prompt"] for e in examples} <= set(split.train)
    assert {e["prompt"] for e in examples} & set(split.eval) == set()
    with pytest.raises(ValueError, match="train_on_eval_prompts"):
        build_finetune_data(
            answers=answers,
            drifts=drifts,
            split=PromptSplit(tuple(prompts), tuple(prompts[:2])),
            settings=FinetuneDataSettings(),
        )
    everything = split_prompts(prompts=prompts, heldout_fraction=1 / 3, seed=3, train_on_eval_prompts=True)
    assert everything.train == everything.eval == tuple(prompts)
    examples = build_finetune_data(
        answers=answers,
        drifts=drifts,
        split=everything,
        settings=FinetuneDataSettings(n_examples=200),
        train_on_eval_prompts=True,
    )
    assert {e["prompt"] for e in examples} & set(split.eval)


def test_mix_ratio_drift_and_length_matching():
    prompts = [f"prompt {i}" for i in range(6)]
    answers, drifts = _material(prompts, n_answers=8)
    split = PromptSplit(tuple(prompts), ())
    settings = FinetuneDataSettings(masked_ratio=0.3, n_examples=50, drift_sentences=(2, 3), seed=1)
    ex = build_finetune_data(answers=answers, drifts=drifts, split=split, settings=settings)
    sc = [e for e in ex if e["kind"] == "self_correction"]
    normal = [e for e in ex if e["kind"] == "normal"]
    assert len(sc) == 15 and len(normal) == 35
    for e in sc:
        assert e["drift"].startswith("Dogs bark") and 2 <= e["drift"].count(".") <= 3
        assert e["response"] == f"{e['drift']} {e['restart_phrase']} {e['answer']}"
        assert e["answer"] in {a["response"] for a in answers if a["prompt"] == e["prompt"]}  # same prompt's answer
    assert len({e["restart_phrase"] for e in sc}) == 15  # phrases cycled, not one repeated
    gap = sum(abs(e["response_words"] - e["target_words"]) for e in normal) / len(normal)
    unmatched = build_finetune_data(
        answers=answers,
        drifts=drifts,
        split=split,
        settings=FinetuneDataSettings(masked_ratio=0.3, n_examples=50, seed=1, length_match=False),
    )
    targets = [e["response_words"] for e in sc]
    mean_sc = sum(targets) / len(targets)
    unmatched_gap = sum(abs(e["response_words"] - mean_sc) for e in unmatched if e["kind"] == "normal") / len(normal)
    assert gap < 0.5 * unmatched_gap
    assert abs(sum(e["response_words"] for e in normal) / len(normal) - mean_sc) < 0.25 * mean_sc


def test_drift_max_score_keeps_only_drift_graded_at_most_it():
    """Ungraded drift (None or NaN: the judge failed) is dropped like drift above the threshold, as the workflow's
    finetune_data does; unscored drift with a threshold set is an error."""
    prompts = ["prompt 0"]
    answers, _ = _material(prompts)
    drifts = [
        {"prompt": "prompt 0", "response": f"Dogs bark {name}. Cats purr.", "score": score}
        for name, score in (("low", 10.0), ("none", None), ("nan", float("nan")), ("high", 80.0), ("edge", 40))
    ]
    settings = FinetuneDataSettings(masked_ratio=1.0, n_examples=20, drift_sentences=(1, 1), drift_max_score=40)
    ex = build_finetune_data(answers=answers, drifts=drifts, split=PromptSplit(tuple(prompts), ()), settings=settings)
    assert {e["drift"] for e in ex} == {"Dogs bark low.", "Dogs bark edge."}
    unscored = [{k: v for k, v in d.items() if k != "score"} for d in drifts]
    with pytest.raises(ValueError, match="drift_max_score = 40 is set but no drift record carries a 'score'"):
        build_finetune_data(answers=answers, drifts=unscored, split=PromptSplit(tuple(prompts), ()), settings=settings)
    everything = dataclasses.replace(settings, drift_max_score=None)
    ex = build_finetune_data(answers=answers, drifts=drifts, split=PromptSplit(tuple(prompts), ()), settings=everything)
    assert len({e["drift"] for e in ex}) == 5


def test_first_sentences():
    assert first_sentences("A b. C d! E f? G h.", 2) == "A b. C d!"
    assert first_sentences("no end", 3) == "no end"


def _tiny_examples(n=8):
    kinds = ["self_correction", "normal"]
    return [
        {
            "example_id": f"e{i}",
            "kind": kinds[i % 2],
            "prompt": ("how do you bake bread", "explain how to make water")[(i // 2) % 2],
            "drift": "the dog and the cat ." if i % 2 == 0 else "",
            "restart_phrase": "wait , not right ." if i % 2 == 0 else "",
            "answer": "bake bread in water and then bake it",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_tiny_model_dir(tiny_llama(vocab_size=len(tok)), tok, tmp_path_factory.mktemp("ft") / "base")


def _settings(**kw):
    base = dict(
        r=4,
        alpha=8,
        dropout=0.0,
        lr=1e-2,
        warmup_steps=1,
        epochs=2,
        micro_batch_size=2,
        gradient_accumulation=2,
        seed=5,
        max_length=64,
    )
    base.update(kw)
    return LoraSettings(**base)


def test_lora_lowers_the_loss(base_dir, tmp_path):
    res = train_lora(
        model_dir=base_dir,
        examples=_tiny_examples(),
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        settings=_settings(epochs=6),
    )
    assert res.steps_per_epoch == 2 and len(res.losses) == 12
    assert sum(res.losses[-2:]) < 0.85 * sum(res.losses[:2])  # measured: 7.87 -> 6.19 (12 steps)
    assert (res.adapter_dir / "adapter_config.json").is_file()
    assert res.lrs[0] < res.lrs[1]  # warm-up, then cosine decay
    assert res.lrs[-1] < res.lrs[2]


def test_resume_continues_after_the_last_epoch(base_dir, tmp_path):
    full = train_lora(
        model_dir=base_dir,
        examples=_tiny_examples(),
        out_dir=tmp_path / "a",
        checkpoint_dir=tmp_path / "ca",
        settings=_settings(dropout=0.1),
        recipe="r1",
    )

    class Killed(Exception):
        pass

    def kill(epoch, step):
        if epoch == 2 and step == 1:
            raise Killed

    with pytest.raises(Killed):
        train_lora(
            model_dir=base_dir,
            examples=_tiny_examples(),
            out_dir=tmp_path / "b",
            checkpoint_dir=tmp_path / "cb",
            settings=_settings(dropout=0.1),
            recipe="r1",
            on_step=kill,
        )
    assert (tmp_path / "cb" / "epoch-001").is_dir() and not (tmp_path / "b" / "adapter").exists()
    steps = []
    resumed = train_lora(
        model_dir=base_dir,
        examples=_tiny_examples(),
        out_dir=tmp_path / "b",
        checkpoint_dir=tmp_path / "cb",
        settings=_settings(dropout=0.1),
        recipe="r1",
        on_step=lambda e, s: steps.append((e, s)),
    )
    assert resumed.resumed_after_epoch == 1 and steps == [(2, 1), (2, 2)]  # epoch 1 not run again
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    other = train_lora(
        model_dir=base_dir,
        examples=_tiny_examples(),
        out_dir=tmp_path / "c",
        checkpoint_dir=tmp_path / "cb",
        settings=_settings(epochs=1),
        recipe="r2",
    )
    assert other.resumed_after_epoch == 0  # another recipe's checkpoint is not resumed


def test_merge_loads_through_esr_models_and_matches_peft(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esr.assets import verify_manifest
    from esr.io import read_json
    from esr.models import load_model_dir

    res = train_lora(
        model_dir=base_dir,
        examples=_tiny_examples(),
        out_dir=tmp_path / "o",
        checkpoint_dir=tmp_path / "ck",
        settings=_settings(epochs=1),
    )
    out = merge_lora(
        base_model_dir=base_dir,
        adapter_dir=res.adapter_dir,
        out_dir=tmp_path / "merged",
        info={
            "model": "tiny-ft",
            "base_model": "tiny",
            "base_revision": "local",
            "recipe_hash": "abc123",
            "lora": _settings().record(),
        },
    )
    loaded = load_model_dir(out)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(res.adapter_dir)
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    ids = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        merged_logits = loaded.model(input_ids=ids).logits
        assert torch.allclose(merged_logits, peft_model(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(merged_logits, base(input_ids=ids).logits, atol=1e-3)  # the adapter did something
    info = read_json(out / "esr_finetune.json")
    assert info["recipe_hash"] == "abc123" and info["base_model"] == "tiny" and info["lora"]["r"] == 4
    assert info["provenance"]["peft"] and info["provenance"]["packages"]["transformers"]
    manifest = verify_manifest(out)
    assert manifest["revision"] == "abc123" and manifest["source"] == "finetuned"


def test_data_file_round_trip_and_recipe_hash(tmp_path):
    prompts = [f"prompt {i}" for i in range(4)]
    answers, drifts = _material(prompts)
    ex = build_finetune_data(
        answers=answers,
        drifts=drifts,
        split=PromptSplit(tuple(prompts), ()),
        settings=FinetuneDataSettings(n_examples=10),
    )
    h1 = write_finetune_data(
        examples=ex, path=tmp_path / "d.parquet", manifest_path=tmp_path / "m.json", manifest={"a": 1}
    )
    assert read_finetune_data(tmp_path / "d.parquet") == ex
    h2 = write_finetune_data(
        examples=ex[:-1], path=tmp_path / "e.parquet", manifest_path=tmp_path / "n.json", manifest={"a": 1}
    )
    assert h1 != h2
    assert n_words(ex[0]["response"]) == ex[0]["response_words"]


# ------------------------------------------------------------------------------------------------ config
def _config_with_finetuned(tmp_path):
    import yaml

    from esr.testing import write_tiny_workflow

    cfg = yaml.safe_load(write_tiny_workflow(tmp_path).read_text())
    base = cfg["models"]["tiny-llama"]
    ft = copy.deepcopy(base)
    ft.update(source="finetuned", base_model="tiny-llama", revision="recipe")
    ft.pop("path")
    cfg["models"]["tiny-ft"] = ft
    cfg["finetune"] = {"enabled": True}
    return cfg


def test_finetuned_source_config_checks(tmp_path):
    cfg = _config_with_finetuned(tmp_path)
    validated = validate_config(copy.deepcopy(cfg))
    assert validated["finetune"]["lora"]["r"] == 32 and validated["finetune"]["train_on_eval_prompts"] is False
    bad = copy.deepcopy(cfg)
    bad["models"]["tiny-ft"].pop("base_model")
    with pytest.raises(ConfigError, match=r"models\.tiny-ft\.base_model"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["models"]["tiny-ft"]["base_model"] = "nope"
    with pytest.raises(ConfigError, match=r"models\.tiny-ft\.base_model.*nope"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["finetune"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"finetune\.enabled"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["models"]["tiny-llama"]["base_model"] = "tiny-ft"
    with pytest.raises(ConfigError, match=r"models\.tiny-llama\.base_model"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["finetune"]["lora"] = {"r": 0}
    with pytest.raises(ConfigError, match=r"finetune\.lora\.r"):
        validate_config(bad)


def test_model_source_registry_is_the_schema_enum():
    assert load_schema()["$defs"]["model"]["properties"]["source"]["enum"] == list(MODEL_SOURCES)


def test_shipped_configs_keep_exp4_off():
    from esr.config import load_config

    default, paper = load_config("config/config.yaml"), load_config("config/paper.yaml")
    assert default["finetune"]["enabled"] is False and paper["finetune"]["enabled"] is False
    lora = paper["finetune"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"], lora["lr"]) == (
        32,
        16,
        0.05,
        "all-linear",
        2e-4,
    )
    assert (lora["warmup_steps"], lora["epochs"], lora["micro_batch_size"] * lora["gradient_accumulation"]) == (
        10,
        4,
        8,
    )
    assert paper["finetune"]["masked_ratio_sweep"] == pytest.approx([i / 10 for i in range(1, 10)])


def test_stages_make_a_model_directory_from_the_tiny_workflow(tmp_path, monkeypatch):
    """finetune_data -> finetune_lora -> merge_lora stage bodies, in process, on the tiny workflow config."""
    from esr.config import model_specs
    from esr.io import read_json
    from esr.models import load_model
    from esr.stages import finetune as stages

    cfg = _config_with_finetuned(tmp_path)
    cfg["finetune"].update(n_examples=6, answers_per_prompt=1, drift_per_prompt=1, max_new_tokens=8, drift_latents=3)
    cfg["finetune"]["lora"] = {"r": 2, "epochs": 1, "max_length": 64}
    cfg = validate_config(cfg)
    monkeypatch.chdir(tmp_path)
    specs = model_specs(cfg)
    base, ft = specs["tiny-llama"], specs["tiny-ft"]
    common = dict(spec=ft, finetune=cfg["finetune"], seed=cfg["seed"])
    material = dict(answers="answers.parquet", drift="drift.parquet")
    prompt_list = str(tmp_path / "prompts.txt")
    stages.finetune_material(
        model_dir=base.local_dir,
        prompt_list=prompt_list,
        manifest="material.json",
        spec=base,
        finetune=cfg["finetune"],
        generation=cfg["generation"],
        seed=cfg["seed"],
        **material,
    )
    stages.finetune_data(
        prompt_list=prompt_list,
        data="data.parquet",
        manifest="data_manifest.json",
        base_spec=base,
        material="material.json",
        **material,
        **common,
    )
    manifest = read_json("data_manifest.json")
    assert manifest["n_examples"] == 6 and not set(manifest["train_prompts"]) & set(manifest["eval_prompts"])
    stages.finetune_lora(
        base_dir=base.local_dir, data="data.parquet", manifest="data_manifest.json", adapter="lora", **common
    )
    stages.merge_lora(
        base_dir=base.local_dir,
        adapter="lora",
        manifest="data_manifest.json",
        model_dir=ft.local_dir,
        base_spec=base,
        **common,
    )
    loaded = load_model(ft)
    assert loaded.n_layers == 4
    info = read_json(f"{ft.local_dir}/esr_finetune.json")
    assert info["data_recipe_hash"] == manifest["recipe_hash"] and info["recipe_hash"] != manifest["recipe_hash"]
    assert info["base_model"] == "tiny-llama" and info["lora"]["r"] == 2

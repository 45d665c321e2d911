"""Builders shared by the tests: trials-table rows with every schema column (``esr.trials``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from esr.trials import TrialSpec, columns, score_columns


def graded_row(
    trial_id: str,
    experiment: str = "exp1",
    model: str = "m",
    latent: int | None = 0,
    label: str = "l",
    boost: float = 1.0,
    prompt_id: int = 0,
    prompt: str = "p",
    seed: int = 0,
    *,
    scores: Sequence[float | None] | None = (),
    texts: Sequence[str] | None = None,
    response: str = "an answer",
    condition: str | None = None,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One graded trials-table row. ``scores`` are the judge's attempt scores (None inside: an unscored attempt;
    ``scores=None``: the attempts list is missing). Keywords that are schema columns (``ablation_set``,
    ``prompt_variant``, ``boost_level``, ``threshold``, ...) set them; other keywords become extra columns."""
    spec_fields = set(TrialSpec.__dataclass_fields__)
    spec = TrialSpec(
        trial_id=trial_id,
        experiment=experiment,
        condition=condition or "steered",
        model=model,
        latent=latent,
        label=label,
        boost=boost,
        prompt_id=prompt_id,
        prompt=prompt,
        judge_prompt=extra.pop("judge_prompt", prompt),
        seed=seed,
        **{k: extra.pop(k) for k in list(extra) if k in spec_fields},
    )
    derived = score_columns([scores]).iloc[0]
    row = {
        **spec.to_dict(),
        "response": response,
        "n_tokens": len(response.split()),
        "finish_reason": "eos",
        "token_ids": [],
        "boost_unit": "raw",
        "steer_coefficient": boost,
        "steer_residual_norm": None,
        "settings": "{}",
        "provenance": "{}",
        "judge_id": "fake:test",
        "judge_template_version": "t",
        "attempt_texts": None if scores is None else list(texts or [f"a{j}" for j in range(len(scores))]),
        "attempt_scores": None if scores is None else list(scores),
        "n_attempts": int(derived["n_attempts"]),
        "first_score": derived["first_score"],
        "last_score": derived["last_score"],
        "error": error,
        "error_kind": None if error is None else "test",
        "judge_raw": None,
        "judge_metadata": json.dumps({}),
    }
    assert set(columns("graded")) <= set(row)
    row.update(extra)
    return row


def run_upstream(root, cfg: dict[str, Any], spec=None, n_shards: int = 2) -> dict[str, Any]:
    """Run the experiment DAG's upstream stages in-process into ``root``: selection, detector discovery, boost
    calibration (``n_shards`` shards) and its gathering. ``spec`` overrides the config's model (e.g. tensor
    parallel). Returns the paths and settings the downstream stages take."""
    from pathlib import Path

    from esr.config import model_specs
    from esr.stages import experiments as st

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = model_specs(cfg)["tiny-llama"]
    spec = spec or base
    p = {
        "spec": spec,
        "model_dir": base.path,
        "prompts": cfg["prompts"]["path"],
        "selection": root / "selection.json",
        "detectors": root / "detectors.json",
        "answers": root / "answers.parquet",
        "thresholds": root / "thresholds.parquet",
    }
    st.select_latents(
        spec=spec,
        model_dir=base.path,
        prompts=p["prompts"],
        labels=cfg["models"]["tiny-llama"]["labels"]["path"],
        settings=cfg["selection"],
        concreteness=cfg["concreteness"],
        seed=cfg["seed"],
        selection=p["selection"],
    )
    st.discover_detectors(
        spec=spec,
        model_dir=base.path,
        prompts=p["prompts"],
        generation=cfg["generation"],
        settings=cfg["detectors"],
        seed=cfg["seed"],
        detectors=p["detectors"],
        answers=p["answers"],
    )
    shards = []
    for shard in range(n_shards):
        shards.append(root / f"cal-{shard}.json")
        st.calibrate_boosts(
            spec=spec,
            model_dir=base.path,
            prompts=p["prompts"],
            selection=p["selection"],
            generation=cfg["generation"],
            settings=cfg["calibration"],
            judge={**cfg["judge"], "cache_dir": str(root / "judge_cache")},
            seed=cfg["seed"],
            n_shards=n_shards,
            shard=shard,
            cache_dir=str(root / "cal_cache"),
            shard_result=shards[-1],
        )
    st.gather_calibration(shards=shards, thresholds=p["thresholds"], summary=root / "cal_summary.json")
    return p


def generate_kwargs(
    cfg: dict[str, Any],
    p: dict[str, Any],
    experiment: str,
    condition: str,
    out_dir,
    n_shards: int = 1,
    shard: int = 0,
    spec=None,
) -> dict[str, Any]:
    """Keyword arguments of ``esr.stages.experiments.generate`` for one (experiment, condition) shard."""
    from pathlib import Path

    out_dir = Path(out_dir)
    return dict(
        spec=spec or p["spec"],
        model_dir=p["model_dir"],
        prompts=p["prompts"],
        selection=p["selection"],
        thresholds=p["thresholds"],
        detectors=p["detectors"],
        generation=cfg["generation"],
        settings=cfg["experiments"],
        experiment=experiment,
        condition=condition,
        n_shards=n_shards,
        shard=shard,
        seed=cfg["seed"],
        trials=out_dir / f"{experiment}-{condition}-gen-{shard}.parquet",
        activations=out_dir / f"{experiment}-{condition}-acts-{shard}.zarr",
    )


def synthetic_trials(experiment: str, model: str, n_latents: int, multi_every: int, esr_every: int, **extra: Any):
    """A graded trials table of 5 trials per latent: trial i is ESR (20 -> 60) when ``i % esr_every == 0``, else
    multi-attempt and worse (50 -> 40) when ``i % multi_every == 0``, else one attempt (30)."""
    import pandas as pd

    rows = []
    for lat in range(n_latents):
        for j in range(5):
            i = lat * 5 + j
            scores = [20.0, 60.0] if i % esr_every == 0 else ([50.0, 40.0] if i % multi_every == 0 else [30.0])
            rows.append(
                graded_row(
                    f"{experiment}-{model}-{i}",
                    experiment,
                    model,
                    lat,
                    "l",
                    1.0,
                    j,
                    "p",
                    100 + i,
                    scores=scores,
                    response="ok",
                    **extra,
                )
            )
    return pd.DataFrame(rows)


def exp1_and_ablation_tables():
    """A 70B-named exp1 table (1000 trials: ESR 40, multi-attempt 80) and an exp3 table ablating the paper's 26-latent
    set (ESR 20, multi-attempt 53), for the summary and audit tests."""
    base = synthetic_trials("exp1", "llama-3.3-70b", 200, 20, 25)
    abl = synthetic_trials(
        "exp3",
        "llama-3.3-70b",
        200,
        30,
        50,
        condition="otd_paper_26",
        ablation_set="otd_paper_26",
        ablate=tuple(range(26)),
    )
    return base, abl


def http_judge(server, backend: str, tmp_path=None, **extra: Any):
    """A judge of ``backend`` (anthropic | openai_compat) on the loopback ``server`` (tests/judge_server.py): short
    timeouts, fast backoff, no rate limit, key from ``ESR_TEST_KEY``; ``extra`` overrides any setting."""
    from esr.judge import build_judge

    cfg = {
        "backend": backend,
        "model": "judge-model",
        "api_key_env": "ESR_TEST_KEY",
        "timeout_s": 2,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "rate_limit_per_s": None,
        "concurrency": 4,
        "base_url": server.root + ("/v1" if backend == "openai_compat" else ""),
        "cache_dir": str(tmp_path / "cache") if tmp_path else None,
        **extra,
    }
    return build_judge(cfg, show_progress=False)


def forward_recording(model, ids, mask, record_layer: int):
    """Logits and decoder block ``record_layer``'s output for one left-padded batch (``position_ids`` from the mask),
    recorded by a hook installed last, so it sees any intervention already installed."""
    import torch

    from esr.models import decoder_layers

    seen: list[torch.Tensor] = []
    handle = decoder_layers(model)[record_layer].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    try:
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    finally:
        handle.remove()
    return logits, seen[0]

"""Dose-response of steering on the embedded default (a benchmark/diagnostic, not a test).

For each boost: the steered latent's mean SAE activation over the generated tokens, the frequency of its label's top
tokens in the answer, distinct-2 (a fluency proxy) and, with ``--judge``, a judge relevance score (0-100).
Boosts are given in the model's ``sae.boost_unit`` and are also reported as multiples of the median residual norm
(from ``<sae dir>/esr_stats.json`` or ``--median-resid-norm``) and as residual-space L2 lengths.

    python tests/benchmarks/dose_response.py                                   # embedded default, 3 latents
    python tests/benchmarks/dose_response.py --latents 5846,4293 --boosts 0,0.25,0.5,0.75,1 --seeds 2 \\
        --judge mypkg.judges:relevance --out dose.csv

``--judge MODULE:FUNCTION`` names a callable ``f(prompt: str, response: str, label: str) -> float`` (0-100).
Needs: the model dir (``resources/models/<model>``), the SAE dir with ``esr_stats.json`` and, for labels and token
frequencies, ``resources/labels/<model>.csv`` (latent,label,frequency,top_tokens); without labels the label columns
are empty and latents are drawn at random from the SAE.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import random
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

WORD = re.compile(r"[a-z0-9']+")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--model", default=None, help="model name in the config (default: the first)")
    p.add_argument("--latents", default=None, help="comma-separated latents (default: --n-latents from labels)")
    p.add_argument("--n-latents", type=int, default=3)
    p.add_argument("--labels", default=None, help="label CSV (default: resources/labels/<model>.csv)")
    p.add_argument("--boosts", default="0,0.25,0.5,0.75,1.0,1.5", help="in the model's boost unit")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--median-resid-norm", type=float, default=None)
    p.add_argument("--judge", default=None, help="MODULE:FUNCTION, f(prompt, response, label) -> 0..100")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed for latent choice and trial seeds")
    p.add_argument("--out", default=None, help="per-trial CSV")
    return p.parse_args(argv)


def read_labels(path: Path) -> dict[int, dict]:
    if not path.exists():
        print(f"note: no label table at {str(path)!r}; label columns stay empty", file=sys.stderr)
        return {}
    with open(path, encoding="utf-8", newline="") as f:
        return {int(row["latent"]): row for row in csv.DictReader(f)}


def label_tokens(row: dict | None) -> set[str]:
    """Lower-cased words of the ``top_tokens`` column (separated by '|', ',' or whitespace)."""
    if not row or not row.get("top_tokens"):
        return set()
    text = row["top_tokens"]
    parts = text.split("|") if "|" in text else text.split(",") if "," in text else text.split()
    return {w for part in parts for w in WORD.findall(part.lower()) if len(w) > 1}


def token_frequency(response: str, tokens: set[str]) -> float:
    words = WORD.findall(response.lower())
    if not words or not tokens:
        return math.nan
    return sum(w in tokens for w in words) / len(words)


def distinct2(response: str) -> float:
    words = response.split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else math.nan


def load_judge(ref: str | None) -> Callable[[str, str, str], float] | None:
    if not ref:
        return None
    module, _, name = ref.partition(":")
    if not name:
        raise SystemExit(f"--judge {ref!r} must be MODULE:FUNCTION")
    return getattr(importlib.import_module(module), name)


def read_prompts(config: dict, n: int) -> list[str]:
    from esr.sae import resolve_path

    path = resolve_path(config["prompts"]["path"])
    if not path.exists():
        print(f"note: prompts file {str(path)!r} missing; using built-in prompts", file=sys.stderr)
        lines = [
            "Explain how to bake a loaf of bread.",
            "Explain how to change a flat tire on a car.",
            "Explain how to write a good cover letter.",
            "Explain how to set up a budget for the month.",
        ]
    else:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:n]


def mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(vals) if vals else math.nan


def main(argv=None) -> int:
    args = parse_args(argv)
    from esr.cli import labels_path
    from esr.config import load_config, model_specs
    from esr.generation import TrialRequest, load_generator
    from esr.steering import Intervention

    config = load_config(args.config)
    specs = model_specs(config)
    name = args.model or next(iter(specs))
    if name not in specs:
        raise SystemExit(f"model {name!r} is not in {args.config!r} (models: {', '.join(specs)})")
    spec = specs[name]
    gen = load_generator(
        spec,
        model_dir=args.model_dir,
        median_resid_norm=args.median_resid_norm,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    directions = gen.directions
    median = directions.median_resid_norm
    if median is None and spec.sae.path:
        from esr.sae import read_median_resid_norm, resolve_path

        try:
            median = read_median_resid_norm(resolve_path(spec.sae.path))
        except (FileNotFoundError, KeyError, ValueError):
            median = None
    labels = read_labels(Path(args.labels) if args.labels else labels_path(name))
    rng = random.Random(args.seed)
    if args.latents:
        latents = [int(x) for x in args.latents.split(",")]
    else:
        pool = [j for j, row in labels.items() if label_tokens(row)] or list(range(directions.d_sae))
        latents = rng.sample(pool, min(args.n_latents, len(pool)))
    boosts = [float(b) for b in args.boosts.split(",")]
    prompts = read_prompts(config, args.n_prompts)
    requests, meta = [], []
    for latent in latents:
        for boost in boosts:
            for p_id, prompt in enumerate(prompts):
                for _ in range(args.seeds):
                    seed = rng.randint(0, 1_000_000)
                    requests.append(
                        TrialRequest(prompt, seed, Intervention(steer_latent=latent, boost=boost, capture=(latent,)))
                    )
                    meta.append((latent, boost, p_id))
    print(
        f"{name}: {len(latents)} latents x {len(boosts)} boosts x {len(prompts)} prompts x {args.seeds} seeds = "
        f"{len(requests)} answers, {args.max_new_tokens} tokens max; boost unit {directions.boost_unit}, "
        f"median residual norm {median}",
        file=sys.stderr,
    )
    judge = load_judge(args.judge)
    results = gen.generate(requests)
    rows = []
    for (latent, boost, p_id), res in zip(meta, results):
        label_row = labels.get(latent)
        label = (label_row or {}).get("label", "")
        norm = directions.residual_norm(latent, boost)
        rows.append(
            {
                "latent": latent,
                "label": label,
                "boost": boost,
                "boost_unit": directions.boost_unit,
                "residual_norm": norm,
                "x_median_norm": norm / median if median else math.nan,
                "prompt_id": p_id,
                "seed": res.seed,
                "n_tokens": res.n_tokens,
                "latent_activation": float(res.activations[:, 0].mean()) if res.n_tokens else math.nan,
                "label_token_freq": token_frequency(res.response, label_tokens(label_row)),
                "distinct2": distinct2(res.response),
                "judge_score": float(judge(res.prompt, res.response, label)) if judge else math.nan,
                "response": res.response,
            }
        )
    if args.out:
        from esr.io import atomic_path

        with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(
        f"\n{'boost':>7} {'x median':>9} {'resid L2':>9} {'latent act':>11} {'label tok freq':>15} "
        f"{'distinct-2':>11} {'judge':>7} {'n':>4}"
    )
    for boost in boosts:
        sel = [r for r in rows if r["boost"] == boost]
        print(
            f"{boost:>7.3g} {mean(r['x_median_norm'] for r in sel):>9.3f} {mean(r['residual_norm'] for r in sel):>9.2f}"
            f" {mean(r['latent_activation'] for r in sel):>11.3f} {mean(r['label_token_freq'] for r in sel):>15.4f}"
            f" {mean(r['distinct2'] for r in sel):>11.3f} {mean(r['judge_score'] for r in sel):>7.1f} {len(sel):>4}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

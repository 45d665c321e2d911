"""Generation throughput: tokens/s steered vs unsteered at several batch sizes (a benchmark, not a test).

    python tests/benchmarks/bench_generation.py                       # SmolLM2 if resources/models/smollm2-135m
    python tests/benchmarks/bench_generation.py --tiny --sizes 1,8,32 --new-tokens 32

Targets: hook overhead (steered / unsteered time - 1) <= 5 %; batch-32 tokens/s >= 8x batch-1 tokens/s.
Every row generates exactly ``--new-tokens`` tokens (EOS ignored, so no row leaves the batch early as finished
rows do in real runs: this is the full-batch decode speed). Steered = every row steered with a random
latent (plus capture of it with ``--capture``); unsteered = no hooks at all. Runs are interleaved and the best of
``--repeats`` is kept, which matters on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from esr.generation import GenerationSettings, SteeredGenerator, TrialRequest
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan

DEFAULT_MODEL_DIR = "resources/models/smollm2-135m"
PROMPTS = [
    "Explain how to bake a loaf of bread.",
    "Explain how to change a flat tire on a car.",
    "Explain how to write a good cover letter.",
    "Explain how to set up a budget for the month.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="HF model dir (tiny model if absent)")
    p.add_argument("--sae-dir", default=None, help="sae-lens SAE dir (default: a random SAE of the right width)")
    p.add_argument("--tiny", action="store_true", help="use esr.testing.tiny_llama regardless of --model-dir")
    p.add_argument("--sizes", default="1,8,32", help="batch sizes, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layer", type=int, default=None, help="injection/SAE layer (default: middle)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--capture", action="store_true", help="also capture the steered latent per token")
    p.add_argument("--temperature", type=float, default=0.6)
    return p.parse_args(argv)


def load(args):
    from esr.models import load_model_dir, wrap_model

    if not args.tiny and Path(args.model_dir, "config.json").exists():
        return load_model_dir(
            args.model_dir, dtype=args.dtype, device="cpu" if not torch.cuda.is_available() else None
        ), Path(args.model_dir).name
    from esr.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    return wrap_model(tiny_llama(vocab_size=len(tok)), tok, dtype=args.dtype), "tiny-llama"


def directions_for(args, loaded) -> SteeringDirections:
    if args.sae_dir:
        from sae_lens import SAE

        sae = SAE.load_from_disk(args.sae_dir, device=str(loaded.device))
    else:
        from esr.testing import tiny_sae

        sae = tiny_sae(d_in=loaded.d_model, d_sae=args.d_sae, kind="jumprelu").to(loaded.device)
    return SteeringDirections(sae, "raw")


def timed(gen: SteeredGenerator, requests) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = gen.generate(requests)
    return time.perf_counter() - t0, sum(r.n_tokens for r in results)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, name = load(args)
    directions = directions_for(args, loaded)
    layer = args.layer if args.layer is not None else loaded.n_layers // 2
    plan = SteeringPlan(layer, layer)
    sizes = [int(s) for s in args.sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for bs in sizes:
        settings = GenerationSettings(
            temperature=args.temperature,
            max_new_tokens=args.new_tokens,
            batch_size=bs,
            ignore_eos=True,
            repetition_penalty=1.1,
        )
        gen = SteeredGenerator(loaded, directions, plan, settings, progress=False)
        latents = torch.randint(0, directions.d_sae, (bs,), generator=g).tolist()
        plain = [TrialRequest(PROMPTS[i % len(PROMPTS)], i) for i in range(bs)]
        steered = [
            TrialRequest(
                p.prompt, p.seed, Intervention(steer_latent=j, boost=2.0, capture=(j,) if args.capture else ())
            )
            for p, j in zip(plain, latents)
        ]
        timed(gen, plain[:1])  # warm-up
        best = {"unsteered": float("inf"), "steered": float("inf")}
        n_tok = {}
        for _ in range(args.repeats):
            for kind, reqs in (("unsteered", plain), ("steered", steered)):
                dt, n = timed(gen, reqs)
                best[kind] = min(best[kind], dt)
                n_tok[kind] = n
        rows.append(
            (
                bs,
                n_tok["unsteered"] / best["unsteered"],
                n_tok["steered"] / best["steered"],
                best["steered"] / best["unsteered"] - 1,
            )
        )
        print(f"  batch {bs}: done", flush=True)
    base = {bs: (u, s) for bs, u, s, _ in rows}
    print(
        f"\nmodel {name} ({loaded.dtype}, {torch.get_num_threads()} threads, layer {layer}, d_sae "
        f"{directions.d_sae}, {args.new_tokens} new tokens, capture={args.capture}, best of {args.repeats})"
    )
    print(
        f"{'batch':>5} {'tok/s unsteered':>16} {'tok/s steered':>14} {'hook overhead':>14} "
        f"{'x batch-1 (unst.)':>18} {'x batch-1 (steer.)':>19}"
    )
    for bs, u, s, over in rows:
        r1 = base.get(sizes[0], (u, s))
        print(f"{bs:>5} {u:>16.1f} {s:>14.1f} {over * 100:>13.1f}% {u / r1[0]:>18.2f} {s / r1[1]:>19.2f}")
    print("targets: hook overhead <= 5%; batch-32 >= 8x batch-1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

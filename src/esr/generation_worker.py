"""Generation worker: run a JSONL file of trial requests through ``esr.generation`` and write JSONL results.

Single process (transformers or DeepSpeed tp 1)::

    python -m esr.generation_worker --config config/config.yaml --model smollm2-135m \\
        --requests requests.jsonl --out results.jsonl [--activations acts.safetensors]

Tensor parallel (DeepSpeed AutoTP; every rank runs the same requests, only rank 0 writes)::

    torchrun --nproc_per_node 2 -m esr.generation_worker --engine deepspeed --tp 2 ...
    deepspeed --num_gpus 2 --module esr.generation_worker --engine deepspeed --tp 2 ...

Request lines: ``{"trial_id": str, "prompt": str, "seed": int, "intervention": {"steer_latent": int|null,
"boost": float, "ablate": [int], "capture": [int]} | null}``. Result lines: ``GenerationResult.to_record()``.
Captured activations go to a safetensors file keyed by trial id ([n_tokens, n_capture] float32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from esr.distributed import init_distributed, rank
from esr.records import Intervention


def read_requests(path: str | Path):
    from esr.generation import TrialRequest

    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                iv = row.get("intervention")
                intervention = None if iv is None else Intervention(
                    steer_latent=iv.get("steer_latent"), boost=float(iv.get("boost", 0.0)),
                    ablate=tuple(iv.get("ablate", ())), capture=tuple(iv.get("capture", ())))
                requests.append(TrialRequest(prompt=row["prompt"], seed=int(row["seed"]), intervention=intervention,
                                             trial_id=row.get("trial_id", f"row{n}")))
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{str(path)!r} line {n}: bad request ({type(e).__name__}: {e})") from e
    return requests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esr.generation_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--model", required=True, help="model name in the config's models section")
    p.add_argument("--requests", required=True, help="JSONL of trial requests")
    p.add_argument("--out", required=True, help="JSONL results (written by rank 0 only, atomically; "
                   "provenance goes to OUT.provenance.json)")
    p.add_argument("--activations", default=None, help="safetensors file for captured activations")
    p.add_argument("--model-dir", default=None, help="override the model directory")
    p.add_argument("--engine", choices=["transformers", "deepspeed"], default=None)
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (DeepSpeed AutoTP)")
    p.add_argument("--device", default=None)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--positions", choices=["all", "generated"], default="all")
    p.add_argument("--ablation-layer", type=int, default=None)
    p.add_argument("--median-resid-norm", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from esr.config import load_config, model_specs
    from esr.generation import load_generator
    from esr.io import write_json, write_text
    from esr.provenance import provenance

    args = build_parser().parse_args(argv)
    world = init_distributed()
    config = load_config(args.config)
    specs = model_specs(config)
    if args.model not in specs:
        raise SystemExit(f"model {args.model!r} is not in {args.config!r} (models: {', '.join(specs)})")
    spec = specs[args.model]
    tp = args.tp or (world if world > 1 else spec.tensor_parallel)
    gen = load_generator(spec, model_dir=args.model_dir, device=args.device, engine=args.engine, tp_size=tp,
                         median_resid_norm=args.median_resid_norm, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, positions=args.positions,
                         ablation_layer=args.ablation_layer, progress=not args.no_progress and rank() == 0)
    results = gen.generate(read_requests(args.requests))
    if rank() == 0:
        lines = [json.dumps(r.to_record()) for r in results]
        write_text(args.out, "\n".join(lines) + ("\n" if lines else ""))
        write_json(f"{args.out}.provenance.json",
                   provenance(config, model=spec.name, sae=spec.sae.ident, world_size=world, requests=args.requests))
        if args.activations:
            save_activations(args.activations, results)
    return 0


def save_activations(path: str | Path, results: Sequence[Any]) -> None:
    from safetensors.torch import save_file

    from esr.io import atomic_path

    tensors = {str(r.trial_id): r.activations.contiguous() for r in results if r.activations is not None}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


if __name__ == "__main__":
    raise SystemExit(main())

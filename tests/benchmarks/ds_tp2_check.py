"""DeepSpeed AutoTP tp_size 2 check on CPU (gloo), tiny Llama and Gemma-2, steered + ablated + captured rows.

Run (2 processes; not part of the pytest set):

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 torchrun --nproc_per_node 2 tests/benchmarks/ds_tp2_check.py

Every rank builds the same tiny model (fixed seed) and generates through ``deepspeed.init_inference`` with
``tensor_parallel={"tp_size": 2}``; the shm all-reduce op is disabled on CPU (it segfaults here; see
``esr.models.disable_deepspeed_shm_allreduce``). Rank 0 compares with the plain transformers engine and prints
the result; exit code 0 when tokens match on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from esr.generation import GenerationSettings, SteeredGenerator, TrialRequest
    from esr.models import disable_deepspeed_shm_allreduce, wrap_model
    from esr.sae import SteeringDirections
    from esr.steering import Intervention, SteeringPlan
    from esr.testing import tiny_gemma2, tiny_llama, tiny_sae, tiny_tokenizer

    disable_deepspeed_shm_allreduce()  # before init_distributed: the shm op is built when the backend starts
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ok = True
    for family, build in (("llama", tiny_llama), ("gemma2", tiny_gemma2)):
        tok = tiny_tokenizer()
        directions = SteeringDirections(tiny_sae(kind="jumprelu"), "raw")
        plan = SteeringPlan(2, 2)
        requests = [
            TrialRequest("how do you bake bread", 1, Intervention(steer_latent=5, boost=8.0, capture=(5,))),
            TrialRequest("the dog", 2, None),
            TrialRequest("explain the car tire", 3, Intervention(ablate=(1, 2), capture=(1,))),
        ]
        for temperature in (0.0, 0.6):
            settings = GenerationSettings(temperature=temperature, max_new_tokens=args.max_new_tokens)
            t0 = time.perf_counter()
            ds_loaded = wrap_model(build(vocab_size=len(tok)), tok, engine="deepspeed", tp_size=world)
            shard = tuple(ds_loaded.model.model.layers[0].self_attn.q_proj.weight.shape)
            ds = SteeredGenerator(ds_loaded, directions, plan, settings, progress=False).generate(requests)
            t_ds = time.perf_counter() - t0
            plain = SteeredGenerator(
                wrap_model(build(vocab_size=len(tok)), tok, device="cpu"), directions, plan, settings, progress=False
            ).generate(requests)
            same = [a.token_ids == b.token_ids for a, b in zip(ds, plain)]
            act_diff = max(
                float((a.activations - b.activations).abs().max())
                for a, b in zip(ds, plain)
                if a.activations is not None
            )
            ok &= all(same)
            print(
                f"[rank {rank}/{world}] {family} T={temperature}: q_proj shard {shard}, tokens equal per row "
                f"{same}, max|d act| {act_diff:.2e}, ds generate {t_ds:.2f}s",
                flush=True,
            )
    flags = torch.tensor([int(ok)])
    dist.all_reduce(flags)
    if rank == 0:
        print("RESULT:", "OK" if int(flags) == world else "MISMATCH", flush=True)
    dist.barrier()
    return 0 if int(flags) == world else 1


if __name__ == "__main__":
    sys.exit(main())

"""Launching a model stage as tensor-parallel ranks: the same stage code on every rank (SPMD), rank 0 the only
writer.

A model with ``tensor_parallel`` N > 1 (the 70B: DeepSpeed AutoTP over N GPUs) cannot be loaded by one process. Its
model stages (selection, detector discovery, boost calibration, generation, exp9 replay; marked with
``esr.stages.model_stage``) therefore run as N ranks under torchrun: :func:`run_ranks` pickles the stage function
(by reference: module and name) with its keyword arguments and launches ``python -m esr.distributed`` N times;
every rank loads its shard of the model and calls the same function, so the model calls (generation, read-out
forward passes) happen in the same order on every rank, as AutoTP's collectives require.

Rules the stage functions follow so the ranks cannot diverge or clash (helpers in ``esr.ranks``):

* only the writer (rank 0) writes files, calls a judge or writes a cache (``is_writer``);
* anything decided from outside state (judge scores, generated text fed to later model calls) is computed on the
  writer and broadcast with ``from_writer`` / ``share``;
* a rank that has no model work left returns early; the writer finishes the stage.

Collectives wait up to ``ESR_DIST_TIMEOUT_MIN`` minutes (default 180) so ranks can wait on the writer's judge calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from esr.ranks import is_writer, rank, world_size

log = logging.getLogger("esr.distributed")


def init_distributed() -> int:
    """Initialise torch.distributed when launched with several processes; returns the world size."""
    import torch

    world = world_size()
    if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        import deepspeed

        from esr.models import disable_deepspeed_shm_allreduce

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            disable_deepspeed_shm_allreduce()  # must precede init_distributed (the op is built there)
        # the non-writer ranks wait in a broadcast while the writer calls a judge: allow long waits
        minutes = float(os.environ.get("ESR_DIST_TIMEOUT_MIN", "180"))
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=minutes)
        )
    return world


def rank_threads(tensor_parallel: int) -> int:
    """Intra-op threads for each of ``tensor_parallel`` ranks: the job's threads shared out, at least 1. The job's
    threads are torch's pool in this process when torch is loaded (``esr.stages.stage_logging`` sets it to the
    rule's ``threads``), else ``OMP_NUM_THREADS``, else the CPU count.

    Snakemake exports ``OMP_NUM_THREADS`` = the rule's threads to every script and torchrun passes a set value on to
    each rank unchanged, so without this the 4 ranks of a 4-CPU 70B job ran 16 threads on 4 CPUs."""
    if "torch" in sys.modules:
        import torch

        threads = torch.get_num_threads()
    else:
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return max(1, threads // max(1, int(tensor_parallel)))


def run_ranks(
    stage: Callable[..., Any], kwargs: dict[str, Any], tensor_parallel: int, launcher: Sequence[str] | None = None
) -> None:
    """Run ``stage(**kwargs)`` as ``tensor_parallel`` ranks under torchrun (``launcher`` overrides the command that
    precedes ``-m esr.distributed``), each with :func:`rank_threads` intra-op threads (``OMP_NUM_THREADS``).
    ``stage`` must be a module-level function (it is pickled by reference).

    Raises ``ValueError`` for ``tensor_parallel`` < 2 and ``RuntimeError`` when a rank fails."""
    if tensor_parallel < 2:
        raise ValueError(f"tensor_parallel = {tensor_parallel}: run the stage in-process instead")
    name = f"{stage.__module__}.{stage.__qualname__}"
    with tempfile.TemporaryDirectory(prefix=".esr-tp-") as tmp:
        args_path = Path(tmp) / "stage.pkl"
        with open(args_path, "wb") as f:
            pickle.dump({"stage": stage, "kwargs": {k: plain(v) for k, v in kwargs.items()}}, f)
        cmd = list(
            launcher
            or [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tensor_parallel}"]
        )
        cmd += ["-m", "esr.distributed", str(args_path), "--tp", str(tensor_parallel)]
        threads = rank_threads(tensor_parallel)
        log.info(
            "launching %d tensor-parallel ranks for %s (%d threads each): %s",
            tensor_parallel,
            name,
            threads,
            " ".join(cmd),
        )
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            raise RuntimeError(
                f"{name}: the {tensor_parallel} tensor-parallel ranks failed (exit {proc.returncode});"
                " see the ranks' output above"
            )


def plain(value: Any) -> Any:
    """Snakemake's file names (str subclasses) and named lists as plain str, list and dict (picklable without
    Snakemake, comparable with ``==``)."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    if isinstance(value, list):  # snakemake.io.Namedlist included
        return [plain(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m esr.distributed",
        description="One rank of a tensor-parallel stage (launched by esr.distributed.run_ranks under torchrun).",
    )
    p.add_argument("args", help="pickle of {'stage': function, 'kwargs': keyword arguments}")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size; must equal the number of ranks")
    a = p.parse_args(argv)
    world = init_distributed()
    if world != a.tp:
        raise SystemExit(
            f"esr.distributed: launched with {world} processes, but the stage needs tensor_parallel "
            f"{a.tp}; use --nproc_per_node {a.tp}"
        )
    logging.basicConfig(
        level=logging.INFO if is_writer() else logging.WARNING,
        format=f"%(asctime)s rank{rank()} %(name)s %(levelname)s: %(message)s",
    )
    with open(a.args, "rb") as f:
        job = pickle.load(f)
    # no closing barrier: ranks without model work left exit while the writer grades and writes
    job["stage"](**job["kwargs"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

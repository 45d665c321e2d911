"""Stages of tensor-parallel models: the same stage code on every rank (SPMD), rank 0 the only writer.

A model with ``tensor_parallel`` N > 1 (the 70B: DeepSpeed AutoTP over N GPUs) cannot be loaded by one process. Its
stages (selection, detector discovery, boost calibration, generation, exp9 replay) therefore run as N ranks under torchrun:
:func:`run_stage` pickles the stage's arguments and launches ``python -m esr.distributed`` N times; every rank loads
its shard of the model and calls the same ``esr.runs`` stage function, so the model calls (generation, read-out
forward passes) happen in the same order on every rank, as AutoTP's collectives require.

Rules the stage functions follow so the ranks cannot diverge or clash:

* only the writer (rank 0) writes files, calls a judge or writes a cache (:func:`is_writer`);
* anything decided from outside state (judge scores, generated text fed to later model calls) is computed on the
  writer and broadcast with :func:`from_writer` / :func:`share`;
* a rank that has no model work left returns early; the writer finishes the stage.

Collectives wait up to ``ESR_DIST_TIMEOUT_MIN`` minutes (default 180) so ranks can wait on the writer's judge calls.

With ``tensor_parallel`` 1 (every other model, the embedded default, tests) :func:`run_stage` just calls the stage
function in-process; :func:`from_writer` and :func:`share` are then plain calls.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("esr.distributed")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Whether this process writes outputs and calls judges (rank 0, or the only process)."""
    return rank() == 0


def init_distributed() -> int:
    """Initialise torch.distributed when launched with several processes; returns the world size."""
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
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(minutes=minutes))
    return world


def _distributed() -> bool:
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def share(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a plain return outside a multi-rank launch)."""
    if not _distributed():
        return obj
    box = [obj if is_writer() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def from_writer(fn: Callable[[], T]) -> T:
    """Call ``fn`` on the writer only and give every rank its result (judge calls, cache reads)."""
    return share(fn() if is_writer() else None)


# ------------------------------------------------------------------------------------------------ launching

STAGES = ("select_latents_stage", "discover_detectors_stage", "calibrate_stage", "generate_stage",
          "sequential_stage")


def run_stage(stage: str, kwargs: dict[str, Any], tensor_parallel: int, scratch_dir: str | Path | None = None,
              launcher: Sequence[str] | None = None) -> None:
    """Run ``esr.runs.<stage>(**kwargs)``: in this process when ``tensor_parallel`` is 1 (or when already one of
    the ranks), otherwise as ``tensor_parallel`` ranks under torchrun (``launcher`` overrides the command that
    precedes ``-m esr.distributed``). The arguments travel in a pickle under ``scratch_dir``, removed afterwards."""
    if stage not in STAGES:
        raise ValueError(f"unknown tensor-parallel stage {stage!r}; known: {', '.join(STAGES)}")
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel = {tensor_parallel} must be >= 1")
    fn = getattr(importlib.import_module("esr.runs"), stage)
    if tensor_parallel == 1 or world_size() > 1:
        fn(**kwargs)
        return
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{stage}-tp", dir=scratch_dir) as tmp:
        args_path = Path(tmp) / "stage_args.pkl"
        with open(args_path, "wb") as f:
            pickle.dump({k: _plain(v) for k, v in kwargs.items()}, f)
        cmd = list(launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={tensor_parallel}"])
        cmd += ["-m", "esr.distributed", stage, str(args_path), "--tp", str(tensor_parallel)]
        log.info("launching %d tensor-parallel ranks for %s: %s", tensor_parallel, stage, " ".join(cmd))
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"{stage}: the {tensor_parallel} tensor-parallel ranks failed (exit {proc.returncode});"
                               " see the ranks' output above")


def _plain(value: Any) -> Any:
    """Snakemake's file names (str subclasses) and named lists as plain str, list and dict, for the pickle."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):  # snakemake.io.Namedlist included
        return [_plain(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esr.distributed", description="One rank of a tensor-parallel stage "
                                "(launched by esr.distributed.run_stage under torchrun).")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("args", help="pickle of the stage's keyword arguments")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size; must equal the number of ranks")
    a = p.parse_args(argv)
    world = init_distributed()
    if world != a.tp:
        raise SystemExit(f"esr.distributed: launched with {world} processes, but the stage needs tensor_parallel "
                         f"{a.tp}; use --nproc_per_node {a.tp}")
    logging.basicConfig(level=logging.INFO if is_writer() else logging.WARNING,
                        format=f"%(asctime)s rank{rank()} %(name)s %(levelname)s: %(message)s")
    with open(a.args, "rb") as f:
        kwargs = pickle.load(f)
    # no closing barrier: ranks without model work left exit while the writer grades and writes
    getattr(importlib.import_module("esr.runs"), a.stage)(**kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

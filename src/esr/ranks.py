"""Rank helpers for stages that run as several tensor-parallel ranks (SPMD): who writes, and how a value decided on
the writer reaches every rank. Imports nothing from ``esr``, so any module may use it.

Outside a multi-rank launch (tensor parallel 1: the embedded default, tests, every model below 70B) every helper is
a plain call: ``is_writer()`` is true, ``share(x)`` returns ``x``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch loads only in a multi-rank launch: CPU stages import this module without it
    import torch

T = TypeVar("T")


def rank() -> int:
    """This process's rank (``RANK`` set by torchrun; 0 outside a launch)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks (``WORLD_SIZE`` set by torchrun; 1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Whether this process writes outputs and calls judges (rank 0, or the only process)."""
    return rank() == 0


def distributed() -> bool:
    """Whether torch.distributed is initialised over more than one rank."""
    if world_size() <= 1:
        return False
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def share(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a plain return outside a multi-rank launch)."""
    if not distributed():
        return obj
    import torch

    box = [obj if is_writer() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def from_writer(fn: Callable[[], T]) -> T:
    """Call ``fn`` on the writer only and give every rank its result (judge calls, cache reads)."""
    return share(fn() if is_writer() else None)


def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` (same shape and dtype on every rank) on every rank, in place; unchanged outside a
    multi-rank launch. Used so sampled tokens are identical on every tensor-parallel rank."""
    if distributed():
        import torch

        torch.distributed.broadcast(tensor, src=0)
    return tensor

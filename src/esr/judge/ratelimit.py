"""Rate limits for judge HTTP calls: per process (:class:`RateLimiter`) or shared by every process that uses the
same judge cache directory (:class:`SharedRateLimiter`), e.g. all grade jobs of a Snakemake run, locally or on a
SLURM cluster.

The shared limiter keeps one number in a small file, the earliest wall-clock time (``time.time()``, seconds since
the epoch) at which the next HTTP attempt may start. A caller takes the file lock (``filelock.FileLock``: an
``fcntl``/``flock`` lock the OS releases when the process dies, so a killed job never leaves the limit locked), reads
that time, reserves ``slot = max(now, next)``, writes ``slot + 1/rate`` and releases the lock, then sleeps until its
slot. Starts are thus spaced at least ``1/rate`` s apart across all processes, whatever their number (the issue's
case: 50 grade jobs at 3 calls/s each sent 150 calls/s; now they send 3/s together). Wall-clock time is used
because monotonic clocks are per machine; across cluster nodes it assumes NTP-synchronised clocks (skews of a few ms
only shift a slot). A reservation whose process dies before its call is a lost slot, never a burst.

On a cluster the cache directory must be on storage every node sees (it already must be: the judge cache entries
are shared the same way) and that storage must support file locks (NFSv4 and most parallel file systems do; Lustre
needs the ``flock`` mount option). Where locking fails (``OSError``) the limiter says so once in the log and falls
back to a per-process limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from filelock import FileLock, Timeout

from esr.io import stable_hash

log = logging.getLogger(__name__)

#: Sub-folder of the judge cache holding the limit files (no ``.json``: the cache counts ``*/*.json`` as entries).
LIMIT_DIR = "ratelimit"
#: A stored next-start time further than this ahead of now is not a live schedule (a clock jump, a bad write): reset.
MAX_AHEAD_S = 3600.0
#: Longest wait for the lock file before giving up on the shared limit for one call (then the local schedule rules).
LOCK_TIMEOUT_S = 30.0


class RateLimiter:
    """Spaces HTTP attempts at least ``1/rate_per_s`` seconds apart within one process (None or <= 0: no limit). It
    keeps its schedule across batches and event loops, so repeated ``grade()`` calls are limited too."""

    def __init__(self, rate_per_s: float | None) -> None:
        self.interval = 1.0 / rate_per_s if rate_per_s and rate_per_s > 0 else 0.0
        self._next = 0.0

    def _reserve_local(self) -> float:
        """The delay (s) until this caller's slot on the process-local schedule (and the schedule moved past it)."""
        now = time.monotonic()
        delay = self._next - now
        self._next = max(now, self._next) + self.interval
        return delay

    async def wait(self) -> None:
        if self.interval <= 0:
            return
        # no await between reading and updating the schedule, so one event loop needs no lock
        delay = self._reserve_local()
        if delay > 0:
            await asyncio.sleep(delay)


class SharedRateLimiter(RateLimiter):
    """At most ``rate_per_s`` HTTP attempt starts per second over every process (and thread, and event loop) whose
    limiter uses the same ``path`` (see the module docstring for the file protocol). ``path``: the limit file; its
    folder is created. Raises ``ValueError`` when ``rate_per_s`` is not a positive number (use ``RateLimiter`` for
    "no limit")."""

    def __init__(self, rate_per_s: float, path: str | os.PathLike) -> None:
        if not rate_per_s or rate_per_s <= 0:
            raise ValueError(f"a shared rate limit needs rate_per_s > 0, got {rate_per_s!r}")
        super().__init__(rate_per_s)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)
        self._shared = True

    def reserve(self) -> float:
        """Reserve the next start slot in the shared schedule; the delay (s) until it (<= 0: start now)."""
        if not self._shared:
            return self._reserve_local()
        try:
            with self._lock:
                now = time.time()
                try:
                    stored = float(self.path.read_text(encoding="ascii") or 0.0)
                except (FileNotFoundError, ValueError):
                    stored = 0.0
                if stored > now + MAX_AHEAD_S:
                    log.warning("rate limit file %s is %.0f s ahead of this clock: reset", self.path, stored - now)
                    stored = now
                slot = max(now, stored)
                # rewritten in place under the lock (no rename: a reader holds the same lock, never sees it torn)
                self.path.write_text(repr(slot + self.interval), encoding="ascii")
                return slot - now
        except Timeout:
            log.warning(
                "rate limit lock %s.lock busy for %.0f s: this call uses the per-process schedule",
                self.path,
                LOCK_TIMEOUT_S,
            )
            return self._reserve_local()
        except OSError as exc:
            self._shared = False
            log.warning(
                "rate limit file %s cannot be locked (%s): judge calls of this process are limited on their own, "
                "not shared with other jobs (put the judge cache_dir on storage with file locks)",
                self.path,
                exc,
            )
            return self._reserve_local()

    async def wait(self) -> None:
        # the lock is a blocking call: take it off the event loop (the judge's concurrent requests keep running)
        delay = await asyncio.to_thread(self.reserve)
        if delay > 0:
            await asyncio.sleep(delay)


def limit_file(cache_dir: str | os.PathLike, *, backend: str, base_url: str, model: str) -> Path:
    """The shared limit file under a judge ``cache_dir`` for one API endpoint and model: calls to the same
    (backend, base_url, model) share one limit, as a provider's rate limits are per model."""
    key = stable_hash({"backend": backend, "base_url": base_url.rstrip("/"), "model": model})[:16]
    return Path(cache_dir) / LIMIT_DIR / f"{key}.next"


def make_rate_limiter(
    rate_per_s: float | None, *, cache_dir: str | os.PathLike | None, backend: str, base_url: str, model: str
) -> RateLimiter:
    """The limiter of one judge: shared through ``cache_dir`` (:class:`SharedRateLimiter`) when a cache directory
    and a positive rate are given, else per process (:class:`RateLimiter`; no limit when the rate is None)."""
    if cache_dir is None or not rate_per_s or rate_per_s <= 0:
        return RateLimiter(rate_per_s)
    return SharedRateLimiter(rate_per_s, limit_file(cache_dir, backend=backend, base_url=base_url, model=model))

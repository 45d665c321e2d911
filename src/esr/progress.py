"""Progress lines for long stages, in the rule's log file.

tqdm bars go to the terminal of the Snakemake process (or nowhere on SLURM), never to ``logs/<rule>/...``: a
calibration shard used to log nothing between "12 to run" and its end for tens of minutes. :class:`Progress` logs one
line per unit of work (latent, batch, episode batch, shard) through :mod:`logging`, which ``esr.stages`` sends to
the rule's log file::

    calibrating latents: 3/12 latents (25%), 0.41 latents/s, elapsed 7.3 s, ETA 22 s

The rate is units done / wall time since the meter started; the ETA is the remaining units at that rate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("esr.progress")


def format_duration(seconds: float) -> str:
    """``seconds`` as ``"7.3 s"``, ``"4 min 05 s"`` or ``"2 h 03 min"``; ``"?"`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Progress:
    """A logger-based progress meter: ``update(n)`` after each unit of work logs done/total, percent, rate (units
    per second of wall time since the meter was created) and ETA.

    ``total`` is the number of units (>= 0; ``ValueError`` otherwise); ``unit`` names them in the line (e.g.
    ``"latents"``); ``min_interval_s`` > 0 rate-limits the lines (the last unit is always logged); ``clock`` is the
    time source in seconds (``time.monotonic``; a fake one in tests)."""

    def __init__(
        self,
        *,
        total: int,
        desc: str,
        unit: str,
        logger: logging.Logger | None = None,
        min_interval_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0:
            raise ValueError(f"Progress {desc!r}: total = {total!r} must be >= 0")
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = 0
        self._log = logger or log
        self._min_interval = float(min_interval_s)
        self._clock = clock
        self._start = clock()
        self._last_logged = -math.inf

    def rate(self) -> float:
        """Units per second so far (0.0 before the first unit or when no time has passed)."""
        elapsed = self._clock() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float:
        """Seconds left at the current rate (``inf`` before the first unit, 0.0 once done)."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        r = self.rate()
        return left / r if r > 0 else math.inf

    def line(self) -> str:
        """The progress line for the current state (what ``update`` logs)."""
        elapsed = self._clock() - self._start
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {self.rate():.3g} {self.unit}/s, "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(self.eta_s())}"
        )

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished units and log the line (unless rate-limited; the final unit always logs)."""
        self.done += int(n)
        now = self._clock()
        if self.done >= self.total or now - self._last_logged >= self._min_interval:
            self._last_logged = now
            self._log.info("%s", self.line())

    def close(self) -> None:
        """Log the final line if the last update was rate-limited (tqdm's ``close``; the meter then stops)."""
        if self.done < self.total and self._last_logged < self._clock():
            self._last_logged = self._clock()
            self._log.info("%s (stopped)", self.line())


def progress(
    items: Iterable[T],
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    logger: logging.Logger | None = None,
    min_interval_s: float = 0.0,
) -> Iterator[T]:
    """Yield ``items`` and log a :class:`Progress` line after each one is processed (i.e. when the next is asked
    for, or the loop ends). ``total`` defaults to ``len(items)`` (``TypeError`` if it has none)."""
    n = len(items) if total is None else total  # type: ignore[arg-type]
    meter = Progress(total=n, desc=desc, unit=unit, logger=logger, min_interval_s=min_interval_s)
    for item in items:
        yield item
        meter.update(1)

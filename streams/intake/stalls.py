"""The event loop's stalls (``LoopWatch``): how late a short timer fires, and how much of it was GC.

While a worker's loop is stopped (a garbage collection walking many live objects, a CPU
starved by other processes, a slow synchronous step) everything it schedules is late by as
much: a call's reserved rate-limit slot woken more than 10 ms late is given up
(``ratelimit.LATE_SLOT_SECONDS``), so a stall costs quota, and it adds to every answer's
latency. The watch fires a timer every ``TICK_SECONDS``; a tick ``STALL_SECONDS`` or more late
is a stall: its lateness goes to ``llm_streams_event_loop_stall_seconds``, and the collector's
time to ``llm_streams_gc_seconds`` (always, from ``gc.callbacks``). Stalls are logged with the
span they may cover (from the tick's start) in epoch seconds and the GC time within them, at most one line per
``LOG_EVERY_SECONDS`` (a line covers every stall since the last).

Usage::

    with LoopWatch(metrics):
        ...  # the worker runs
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from streams.metrics import PipelineMetrics

log = logging.getLogger("streams.worker")

TICK_SECONDS = 0.02
STALL_SECONDS = 0.05
LOG_EVERY_SECONDS = 1.0


class GcClock:
    """Seconds spent in garbage collection since creation (``gc.callbacks``)."""

    def __init__(self, on_collected: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = 0.0
        self._clock = clock
        self._started: float | None = None
        self._on_collected = on_collected

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            spent = self._clock() - self._started
            self._started = None
            self.total += spent
            if self._on_collected is not None:
                self._on_collected(spent)

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class StallLog:
    """Stalls seen, reported at most once per ``LOG_EVERY_SECONDS`` (a line covers them all)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last_line = -float("inf")
        self._pending: list[tuple[float, float, float]] = []  # (epoch start, seconds, gc seconds)

    def add(self, start: float, seconds: float, gc_seconds: float) -> None:
        self._pending.append((start, seconds, gc_seconds))
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = self._clock()
        if not self._pending or (not force and now - self._last_line < LOG_EVERY_SECONDS):
            return
        stalls, self._pending = self._pending, []
        self._last_line = now
        first = stalls[0][0]
        end = max(s + d for s, d, _ in stalls)
        longest = max(d for _, d, _ in stalls)
        in_gc = sum(g for _, _, g in stalls)
        log.warning(
            "event loop stalled %d time(s) from %.3f to %.3f (epoch s), longest %.0f ms, "
            "%.0f ms of them in garbage collection", len(stalls), first, end, longest * 1000,
            in_gc * 1000,
        )


class LoopWatch:
    """Watches the running loop's lateness while entered; see the module docstring."""

    def __init__(self, metrics: PipelineMetrics) -> None:
        self._metrics = metrics
        self._gc = GcClock(metrics.gc_seconds.inc)
        self._log = StallLog()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> LoopWatch:
        self._gc.__enter__()
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self._gc.__exit__()
        self._log.flush(force=True)

    async def _watch(self) -> None:
        observe = self._metrics.loop_stalls.observe
        while True:
            before, wall, in_gc = time.monotonic(), time.time(), self._gc.total
            await asyncio.sleep(TICK_SECONDS)
            late = time.monotonic() - before - TICK_SECONDS
            if late >= STALL_SECONDS:
                observe(late)
                # the loop stopped somewhere after the tick began: log the whole span it may cover
                self._log.add(wall, TICK_SECONDS + late, self._gc.total - in_gc)
            else:
                self._log.flush()

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time

import pytest
from prometheus_client import CollectorRegistry

from streams.intake import stalls
from streams.intake.stalls import GcClock, LoopWatch, StallLog
from streams.metrics import PipelineMetrics

LINE = re.compile(r"stalled (\d+) time\(s\) from ([\d.]+) to ([\d.]+) \(epoch s\), longest (\d+) ms, "
                  r"(\d+) ms of them in garbage collection")


def _sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


def test_gc_clock_adds_the_time_between_start_and_stop() -> None:
    now = [10.0]
    spent: list[float] = []
    c = GcClock(spent.append, clock=lambda: now[0])
    c("stop", {})  # a stop without its start (entered mid-collection) adds nothing
    c("start", {})
    now[0] = 10.25
    c("stop", {})
    c("start", {})
    now[0] = 10.5
    c("stop", {})
    assert c.total == pytest.approx(0.5)
    assert spent == [pytest.approx(0.25), pytest.approx(0.25)]


def test_gc_clock_sees_real_collections_only_while_entered() -> None:
    with GcClock() as c:
        gc.collect()
        seen = c.total
    assert seen > 0
    assert c not in gc.callbacks
    gc.collect()
    assert c.total == seen


def test_stall_log_writes_at_most_one_line_a_second_covering_every_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    sl = StallLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "streams.worker"):
        sl.add(1000.0, 0.08, 0.0)          # first: at once
        now[0] = 100.3
        sl.add(1000.5, 0.2, 0.15)          # held: a line was written 0.3 s ago
        sl.add(1000.8, 0.06, 0.0)
        now[0] = 100.9
        sl.flush()                         # still within the second
        assert len(caplog.records) == 1
        now[0] = 101.05
        sl.flush()                         # the held two, in one line
        sl.flush(force=True)               # nothing left: no line
    lines = [LINE.search(r.getMessage()) for r in caplog.records]
    assert all(lines) and len(lines) == 2
    first, second = (m.groups() for m in lines if m)
    assert first == ("1", "1000.000", "1000.080", "80", "0")
    assert second == ("2", "1000.500", "1000.860", "200", "150")


async def test_a_blocked_loop_is_measured_logged_and_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    with caplog.at_level(logging.WARNING, "streams.worker"):
        with LoopWatch(metrics):
            await asyncio.sleep(stalls.TICK_SECONDS * 3)  # ticks on time: no stall
            assert _sample(registry, "llm_streams_event_loop_stall_seconds_count") == 0
            t0 = time.time()
            time.sleep(0.15)                      # the loop blocked
            gc.collect()                          # and a collection within the same stall
            t1 = time.time()
            await asyncio.sleep(stalls.TICK_SECONDS * 3)
    assert _sample(registry, "llm_streams_event_loop_stall_seconds_count") == 1
    assert _sample(registry, "llm_streams_event_loop_stall_seconds_sum") >= 0.14
    assert _sample(registry, "llm_streams_gc_seconds_total") > 0
    [m] = [LINE.search(r.getMessage()) for r in caplog.records]
    assert m is not None
    n, start, end, longest, _ = m.groups()
    assert n == "1" and int(longest) >= 140
    assert float(start) <= t0 + 0.01 and float(end) >= t1 - 0.01  # the span holds the stall

"""A stop that hangs ends anyway: exit 0 when only Kafka's side is left (our drain is done),
else the watchdog logs what still runs and exits 1."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import asyncio, logging
from streams.intake.stopping import _StopWatchdog

logging.basicConfig(level=logging.INFO)

async def main():
    _StopWatchdog.arm(0.3)
    await asyncio.sleep(30)  # a stop that never finishes

asyncio.run(main())
"""


def test_a_hanging_stop_exits_1_with_the_tasks_logged() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 1
    assert "stop did not finish within 0 s" in out.stderr
    assert "main (<string>" in out.stderr  # the task still running, and where it waits


DRAINED = """
import asyncio, logging
from streams.intake.stopping import _StopWatchdog

logging.basicConfig(level=logging.INFO)

async def main():
    _StopWatchdog.arm(0.3, lambda: True)
    await asyncio.sleep(30)  # e.g. aiokafka waiting on a group coordinator that is gone

asyncio.run(main())
"""


def test_a_stop_left_waiting_on_kafka_after_our_drain_exits_0_in_one_line() -> None:
    out = subprocess.run([sys.executable, "-c", DRAINED], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "in-flight work drained" in lines[0] and "exiting 0" in lines[0]


def test_the_state_dump_names_what_the_worker_holds() -> None:
    from streams.config import load_settings
    from streams.intake.runtime import Runtime

    settings = load_settings(environ={})
    state = Runtime(settings).state()  # no app yet: our own side only
    assert state["in_flight_slots_free"] == settings.limits.max_inflight + settings.limits.max_queued
    assert state["batches_ahead_free"] == 2
    assert state["tracker"] == {} and state["tasks"] == 0


async def test_a_stop_step_stuck_on_kafka_is_left_behind_not_awaited() -> None:
    # e.g. faust's commit waiting in its consumer thread on a coordinator that is gone: it
    # does not unwind when cancelled, so asyncio.wait_for would wait for it forever
    import asyncio
    import time

    from streams.intake.stopping import _within

    release = asyncio.Event()

    async def stuck() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    started = time.monotonic()
    await _within(stuck(), 0.2, "a stuck step")
    assert time.monotonic() - started < 2
    release.set()
    await asyncio.sleep(0)

"""Worker processes come and go: a SIGKILL loop, and the group scaled 1 -> 3 -> 1."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.faults.trial import Fleet, Trial, configure, keep_polling, metric, pick, stop_all
from tests.integration.harness import Mock, Stack, Worker


@pytest.mark.timeout(pick(300, 1500))
async def test_sigkill_a_worker_every_few_seconds(stack: Stack, mocks: list[Mock], fleet: Fleet) -> None:
    n = pick(3000, 20_000)
    await configure(mocks, latency_ms=40, jitter_ms=30)
    stack.overrides["kafka.session_timeout_seconds"] = 6  # the broker's minimum: shorter stalls
    # a group-wide rate keeps the run long enough for several kills on any machine; the
    # requests waiting for it are in flight, so every kill drops hundreds of them
    stack.overrides["limits.max_requests_per_second"] = pick(150, 400)
    async with Trial("1 SIGKILL loop", stack, mocks) as trial:
        workers = [fleet.start(), fleet.start()]
        await asyncio.gather(*(w.ready() for w in workers))
        await trial.send([trial.request(i) for i in range(n)])
        kills = 0
        replacement = None
        while trial.answered < n:
            # every few seconds, but never before the last replacement is up: each kill then
            # lands on a worker with work in flight, not on one still starting
            waits = [keep_polling(trial, 4.0)] + ([replacement.ready(90)] if replacement else [])
            await asyncio.gather(*waits)
            if trial.answered >= n:
                break
            await trial.kill(fleet.running[0])
            kills += 1
            replacement = fleet.start()
        await trial.wait_all(timeout=pick(240, 900))
        assert kills >= 2, f"only {kills} kills: the run was too short to test anything"
        # While the workers still run, the committed offsets must reach every partition's end
        # (after the stop, a partition behind could also be work the stop left to redo).
        behind = await trial.stalled(timeout=pick(60, 120))
        for w in fleet.running:  # a stall: each worker logs its tracker and consumer state
            if behind:
                w.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1 if behind else 0)
        await stop_all(fleet.running)
        await trial.verdict(f"{kills} SIGKILLs, each followed by a restart; in flight at "
                            f"each kill: {', '.join(map(str, trial.kills))}")
        assert not behind, (f"partitions {{partition: (committed, end)}} behind with the workers "
                            f"running: {behind}; their state is in {stack.tmp}/worker-*.log")


async def _until_in_flight(worker: Worker, trial: Trial, n: int, timeout: float = 120) -> int:
    """Until the worker holds at least n requests in flight; how many it holds."""
    deadline = time.monotonic() + timeout
    while (held := int(await metric(worker, "llm_streams_in_flight"))) < n:
        assert time.monotonic() < deadline, f"only {held} in flight after {timeout:.0f} s"
        await keep_polling(trial, 0.5)
    return held


@pytest.mark.timeout(pick(300, 1200))
@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
async def test_scale_one_three_one_with_thousands_in_flight(
    stack: Stack, mocks: list[Mock], fleet: Fleet, cache: bool
) -> None:
    # Cache off: no content lock, so the records the joiners take over while the first worker
    # still calls them are held apart by the request id's lock alone (``ResponseCache._by_id``;
    # before it, they were called twice).
    n = pick(8000, 24_000)
    cycles = pick(1, 3)
    await configure(mocks, latency_ms=6000, jitter_ms=1000)  # 2000 slots fill at 330/s
    stack.overrides["limits.max_inflight"] = 2000
    stack.overrides["worker.shutdown_grace_seconds"] = 10
    stack.overrides["cache.enabled"] = cache
    name = "4 scale 1-3-1" if cache else "4b scale 1-3-1, cache off"
    async with Trial(name, stack, mocks) as trial:
        first = fleet.start()
        await first.ready()
        chunk = n // cycles
        grew: list[int] = []
        shrank: list[int] = []
        for c in range(cycles):
            # Each cycle brings its own records, so every rebalance finds thousands in flight
            # however fast the previous cycle went (a record answered is not in flight).
            await trial.send([trial.request(i) for i in range(c * chunk, (c + 1) * chunk)])
            grew.append(await _until_in_flight(first, trial, 1500))
            trial.events.append((time.time(), "joining"))
            joiners = [fleet.start(), fleet.start()]  # 1 -> 3: rebalance with ~2000 in flight
            await asyncio.gather(*(w.ready() for w in joiners))
            trial.events.append((time.time(), "joined"))
            # the joiners take partitions with records waiting: each fills its own slots
            held = [await _until_in_flight(w, trial, 300) for w in joiners]
            await keep_polling(trial, 2.0)
            shrank.append(sum(held))
            trial.events.append((time.time(), "leaving"))
            await stop_all(joiners)  # 3 -> 1: both leave at once, draining what they hold
            trial.events.append((time.time(), "left"))
        await trial.wait_all(timeout=pick(300, 900))
        assert first.alive()
        await stop_all(fleet.running)
        await trial.verdict(f"{cycles}x 1 -> 3 -> 1 workers; in flight when the group grew: "
                            f"{', '.join(map(str, grew))}; held by the two leaving: "
                            f"{', '.join(map(str, shrank))}")

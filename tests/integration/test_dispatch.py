"""Dispatch on the real broker and Redis: weights, limits across workers, cooldowns, retries."""

from __future__ import annotations

import asyncio
import statistics
import time

from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    StartMock,
    answered,
    encode,
    produce,
    request,
    running,
    window_sums,
)


def _eps(mocks: list[Mock], weights: list[float], **kw: object) -> list[dict[str, object]]:
    return [
        {"name": f"ep{i}", "url": f"{m.url}/v1", "weight": w, "timeout_seconds": 2, **kw}
        for i, (m, w) in enumerate(zip(mocks, weights, strict=False))
    ]


async def test_weights_3_1_0(stack: Stack, mocks: list[Mock], mock_llm: StartMock) -> None:
    third = await mock_llm()
    stack.endpoints = _eps([*mocks, third], [3, 1, 0])
    stack.overrides["cache.enabled"] = False
    n = 10_000
    async with running(stack):
        outs = await answered(stack, (request(i) for i in range(n)), timeout=240)
    by_ep = {o.value["endpoint"] for o in outs}
    assert "ep2" not in by_ep
    calls = [(await m.stats())["calls"] for m in (*mocks, third)]
    total = sum(calls)
    assert total == n
    assert abs(calls[0] / total - 0.75) <= 0.02 and abs(calls[1] / total - 0.25) <= 0.02
    assert calls[2] == 0


async def test_rpm_holds_across_three_workers(stack: Stack, mocks: list[Mock]) -> None:
    stack.endpoints = _eps(mocks[:1], [1], rpm=600)
    stack.overrides["cache.enabled"] = False
    async with running(stack, 3):
        n = 200
        outs = await answered(stack, (request(i) for i in range(n)), timeout=120)
        assert all(o.value["status"] == "ok" for o in outs)
        stats = await mocks[0].stats(log=True)
        assert stats["calls"] == n
        times = [c["t"] for c in stats["calls_log"]]
        stalls = [(a, b) for a, b in stats["stalls_log"]]
        most, _, judged = window_sums(times, [1] * len(times), 1.0, stalls)
        assert judged >= 0.5, f"the mock stalled too often to measure (load?): {judged:.0%}"
        assert most <= 10, (most, stats["max_per_second"])


async def test_retry_after_429_cools_the_endpoint_and_traffic_flows_elsewhere(
    stack: Stack, mocks: list[Mock]
) -> None:
    stack.endpoints = _eps(mocks, [1, 1])
    stack.overrides["cache.enabled"] = False
    await mocks[0].configure(down=True, status_on_error=429, retry_after=2)
    async with running(stack):
        n = 400
        outs = await answered(stack, (request(i) for i in range(n)), timeout=120)
        assert all(o.topic == stack.responses for o in outs), "nothing may be dead-lettered"
        log = (await mocks[0].stats(log=True))["log"]
        assert log and all(status == 429 for _, status in log)
        # after a 429 (calls already on the wire aside), ep0 gets nothing for 2 s
        first = log[0][0]
        quiet = [t for t, _ in log if first + 0.2 < t < first + 1.9]
        assert quiet == [], f"{len(quiet)} calls during the 2 s cooldown"
        assert (await mocks[1].stats())["ok"] == n


async def test_dead_endpoint_is_probed_at_most_once_per_cooldown(
    stack: Stack, mocks: list[Mock]
) -> None:
    stack.endpoints = [
        {"name": "dead", "url": "http://127.0.0.1:1/v1", "weight": 1, "timeout_seconds": 1},
        {"name": "live", "url": f"{mocks[0].url}/v1", "weight": 1, "timeout_seconds": 2},
    ]
    stack.overrides["cache.enabled"] = False
    stack.overrides["retry.cooldown_seconds"] = 1.0
    stack.overrides["retry.cooldown_after_failures"] = 1
    async with running(stack):
        n = 500
        outs = await answered(stack, (request(i) for i in range(n)), timeout=120)
        assert all(o.topic == stack.responses and o.value["endpoint"] == "live" for o in outs)


async def test_400_is_terminal_and_500_exhausts(stack: Stack, mocks: list[Mock]) -> None:
    stack.endpoints = _eps(mocks, [1, 1])
    stack.overrides["cache.enabled"] = False
    stack.overrides["retry.max_attempts"] = 3
    await mocks[0].configure(down=True, status_on_error=400)
    await mocks[1].configure(down=True, status_on_error=400)
    async with running(stack):
        async with Collector(stack) as col:
            await produce(stack.requests, encode([request(1)]))
            (out,) = await col.wait_for(1)
            assert out.topic == stack.dlq
            assert out.value["error"]["type"] == "upstream" and out.value["error"]["status"] == 400
            assert out.value["attempts"] == 1 and len(out.value["endpoints"]) == 1
            for m in mocks:
                await m.configure(status_on_error=500)
            await produce(stack.requests, encode([request(2)]))
            outs = await col.wait_for(2)
        dl = [o for o in outs if o.value["id"] == "req-2"][0]
        assert dl.value["error"]["type"] == "exhausted" and dl.value["error"]["status"] == 500
        assert dl.value["attempts"] == 3 and len(dl.value["endpoints"]) == 3
        assert set(dl.value["endpoints"]) == {"ep0", "ep1"}


async def test_priority_under_saturation(stack: Stack, mocks: list[Mock]) -> None:
    stack.endpoints = _eps(mocks[:1], [1])
    stack.overrides["cache.enabled"] = False
    stack.overrides["limits.max_requests_per_second"] = 100
    stack.overrides["limits.priority_aging_ms"] = 60_000
    async with running(stack):
        # arrival at twice the limit: 200/s for 4 s, priorities mixed evenly
        n = 800
        t0 = time.monotonic()
        for chunk in range(8):
            docs = [request(i, priority=(0 if i % 2 else 9))
                    for i in range(chunk * 100, chunk * 100 + 100)]
            await produce(stack.requests, encode(docs))
            await asyncio.sleep(max(0.0, t0 + (chunk + 1) * 0.5 - time.monotonic()))
        async with Collector(stack) as col:
            outs = await col.wait_for(n, timeout=120)
        assert all(o.value["status"] == "ok" for o in outs)
        by_pri: dict[int, list[int]] = {0: [], 9: []}
        for o in outs:
            i = int(o.value["id"][4:])
            by_pri[0 if i % 2 else 9].append(o.value["latency_ms"])
        p0, p9 = statistics.median(by_pri[0]), statistics.median(by_pri[9])
        assert p0 <= p9 / 5, (p0, p9)

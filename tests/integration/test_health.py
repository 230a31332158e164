"""/healthz, /readyz and /metrics on a running worker, with a Redis of the test's own that is
stopped and started again (the shared Redis is never touched)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    Worker,
    encode,
    produce,
    request,
    running,
)
from tests.integration.servers import PrivateRedis, serving


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with serving(PrivateRedis(tmp_path / "redis")) as server:
        yield server


async def _status(worker: Worker, path: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{worker.metrics_port}{path}"
    ) as r:
        return r.status


async def _wait_status(worker: Worker, path: str, status: int, timeout: float) -> float:
    """Seconds until ``path`` answered ``status``."""
    start = time.monotonic()
    while (got := await _status(worker, path)) != status:
        assert time.monotonic() - start < timeout, f"{path} still {got} after {timeout} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def _samples(worker: Worker) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = await worker.metrics_text()
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def _wait_lag_zero(worker: Worker, timeout: float = 20) -> dict[tuple[tuple[str, str], ...],
                                                                       float]:
    deadline = time.monotonic() + timeout
    while True:
        lag = (await _samples(worker)).get("llm_streams_consumer_lag", {})
        if len(lag) == 4 and sum(lag.values()) == 0:
            return lag
        assert time.monotonic() < deadline, f"consumer lag {lag}"
        await asyncio.sleep(0.5)


async def test_metrics_and_readiness_follow_redis(
    private_redis: PrivateRedis, stack: Stack, mocks: list[Mock]
) -> None:
    stack.overrides["redis.url"] = private_redis.url()
    async with running(stack) as [worker]:
        assert await _status(worker, "/healthz") == 200
        n = 30
        await produce(stack.requests, encode(request(i) for i in range(n)))
        async with Collector(stack) as col:
            await col.wait_for(n, timeout=60)
            samples = await _samples(worker)
            assert samples["llm_streams_records_consumed_total"][(("topic", stack.requests),)] == n
            assert samples["llm_streams_outputs_total"][(("outcome", "ok"),)] == n
            assert samples["llm_streams_assigned_partitions"][()] == 4
            lag = await _wait_lag_zero(worker)
            assert {dict(k)["topic"] for k in lag} == {stack.requests}

            private_redis.stop()
            await _wait_status(worker, "/readyz", 503, timeout=10)
            assert await _status(worker, "/healthz") == 200  # alive, only not ready
            # the worker keeps answering without Redis (no cache, local limits)
            await produce(stack.requests, encode([request(n)]))
            await col.wait_for(n + 1, timeout=30)

            private_redis.start()
            await _wait_status(worker, "/readyz", 200, timeout=15)
            await produce(stack.requests, encode([request(n + 1)]))
            outs = await col.wait_for(n + 2, timeout=30)
        assert all(o.value["status"] == "ok" for o in outs)
        assert worker.alive()

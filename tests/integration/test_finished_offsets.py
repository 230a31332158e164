"""After a SIGKILL, records finished above the committed offset are not answered again.

One partition; its first record waits on a slow endpoint, so the committed offset stays at it
while the records behind it are answered and published. The worker is killed, a new one
starts at the committed offset: it must answer the slow record and republish none of the
others (the commit's metadata named them finished).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from tests.integration.harness import Collector, Mock, Stack, Worker, encode, produce, start_worker

N = 400  # records finished behind the slow head


async def _committed(stack: Stack) -> tuple[int | None, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(stack.group)
    finally:
        await admin.close()
    meta = got.get(TopicPartition(stack.requests, 0))
    if meta is None or meta.offset < 0:
        return None, ""
    return meta.offset, meta.metadata or ""


async def _skipped(worker: Worker) -> float:
    from tests.faults.trial import metric

    return await metric(worker, "llm_streams_records_skipped_finished_total")


@pytest.fixture
def slow_head_stack(stack: Stack, mocks: list[Mock]) -> Stack:
    stack.endpoints = [
        {"name": "slow", "url": f"{mocks[0].url}/v1", "models": ["slow-model"],
         "timeout_seconds": 120},
        {"name": "fast", "url": f"{mocks[1].url}/v1", "models": ["fast-model"],
         "timeout_seconds": 5},
    ]
    stack.overrides["kafka.partitions"] = 1
    return stack


@pytest.mark.timeout(300)
async def test_sigkill_republishes_nothing_finished_above_the_commit(
    slow_head_stack: Stack, mocks: list[Mock]
) -> None:
    stack = slow_head_stack
    await mocks[0].configure(latency_ms=60_000)
    worker = start_worker(stack)
    await worker.ready()
    await produce(stack.requests, encode([{"id": "first", "input": "x", "model": "fast-model"}]))
    docs: list[dict[str, Any]] = [{"id": "head", "input": "slow one", "model": "slow-model"}]
    docs += [{"id": f"r{i}", "input": f"fast {i}", "model": "fast-model"} for i in range(N)]
    async with Collector(stack) as col:
        await col.wait_for(1, timeout=60)
        await produce(stack.requests, encode(docs))
        await col.wait_for(N + 1, timeout=120)  # everything but the head (offset 1)
        assert "head" not in col.ids()
        # the commit interval is 0.5 s: a few of them after the last output, its offset is
        # in a commit (the committed offset itself stays at the head)
        deadline = time.monotonic() + 30
        while (await _committed(stack))[1] == "" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        committed, metadata = await _committed(stack)
        assert committed == 1, "the slow head was committed past"
        worker.kill()
        await mocks[0].configure(latency_ms=0)
        worker = start_worker(stack)
        try:
            await worker.ready()
            outs = await col.wait_for(N + 2, timeout=120)
            await asyncio.sleep(3)  # anything republished arrives now
            for _ in range(5):
                await col.poll()
            skipped = await _skipped(worker)
        finally:
            assert worker.stop() == 0
    per_id = Counter(o.value.get("id") for o in col.outputs)
    again = sorted((rid for rid, n in per_id.items() if n > 1), key=str)
    assert not again, f"{len(again)} finished records republished after the kill, e.g. {again[:5]}"
    assert per_id["head"] == 1 and len(outs) == N + 2
    assert skipped == N, f"the new worker skipped {skipped} of {N} finished records"
    assert metadata.startswith("lls1:")
    assert (await _committed(stack))[0] == N + 2  # the partition committed to its end

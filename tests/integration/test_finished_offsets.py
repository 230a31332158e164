"""After a SIGKILL, records finished above the committed offset are not answered again.

One partition; its first record waits on a slow endpoint, so the committed offset stays at it
while the records behind it are answered and published. The worker is killed, a new one
starts at the committed offset: it must answer the slow record and republish none of the
others (the commit's metadata named them finished). And at a rebalance, the answers still in
flight on the old owner are published once, by the new owner.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from streams.intake.finished import token_of
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
@pytest.mark.parametrize("metadata_bytes", [4096, 20])
async def test_sigkill_republishes_nothing_finished_above_the_commit(
    slow_head_stack: Stack, mocks: list[Mock], metadata_bytes: int
) -> None:
    """With 20 bytes, a commit's metadata has room for the partition's token alone: the
    finished records are named only by the marks in Redis (``intake/marks.py``), as are
    records published after the last commit before a crash."""
    stack = slow_head_stack
    stack.overrides["kafka.commit_metadata_max_bytes"] = metadata_bytes
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
    token = token_of(metadata)
    assert token is not None
    if metadata_bytes == 20:
        assert metadata == f"lls2:{token}."  # no room to name an offset
    assert (await _committed(stack))[0] == N + 2  # the partition committed to its end


@pytest.mark.timeout(300)
async def test_a_rebalance_hands_the_new_owner_the_answers_still_in_flight(
    stack: Stack, mocks: list[Mock]
) -> None:
    """A worker holds every record in a slow call when a second one joins and takes some of its
    partitions. The first one's answers for those partitions come back after the rebalance:
    kept in the idempotency store, left for the new owner to publish (``intake/owner.py``).
    Before, both published them: every record of a moved partition was output twice."""
    stack.endpoints = [{"name": f"slow-{i}", "url": f"{m.url}/v1", "timeout_seconds": 120}
                       for i, m in enumerate(mocks)]
    stack.overrides["kafka.partitions"] = 4
    for m in mocks:
        await m.configure(latency_ms=15_000)
    n = 200
    docs = [{"id": f"r{i}", "input": f"slow {i}"} for i in range(n)]
    first = start_worker(stack)
    second = None
    try:
        await first.ready()
        async with Collector(stack) as col:
            await produce(stack.requests, encode(docs), keys=[f"k{i}".encode() for i in range(n)])
            deadline = time.monotonic() + 60
            while sum([(await m.stats())["distinct_prompts"] for m in mocks]) < n:
                assert time.monotonic() < deadline, "the records were never all called"
                await asyncio.sleep(0.2)
            second = start_worker(stack)  # joins: a rebalance while every call is in flight
            await second.ready()
            await col.wait_for(n, timeout=120)
            await asyncio.sleep(3)  # anything published twice arrives now
            for _ in range(5):
                await col.poll()
            handed = await first.metric("llm_streams_answers_handed_over_total")
            moved = await second.metric("llm_streams_assigned_partitions")
    finally:
        codes = [w.stop() for w in (first, second) if w is not None]
    assert codes == [0] * len(codes)
    per_id = Counter(o.value.get("id") for o in col.outputs)
    again = sorted(rid for rid, k in per_id.items() if k > 1)
    assert not again, f"{len(again)} records output twice, e.g. {again[:5]}"
    assert set(per_id) == {d["id"] for d in docs}
    assert all(o.value["status"] == "ok" for o in col.outputs)
    calls = sum([(await m.stats())["calls"] for m in mocks])
    assert calls == n, f"{calls} upstream calls for {n} records"
    assert moved > 0 and handed > 0, (moved, handed)  # the scenario happened

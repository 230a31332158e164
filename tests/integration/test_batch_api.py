"""Work that can wait (issue #21) on the real broker and Redis, with the mock's Batch API.

Sized for the integration suite: a short poll interval, job wait and completion delay.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from mockllm.server import completion_body
from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    answered,
    encode,
    produce,
    request,
    running,
    start_worker,
)

PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.6}  # gpt-4o-mini's, per million tokens
PARTITIONS = 4


def batch_stack(stack: Stack, **policy: Any) -> Stack:
    stack.endpoints[0]["batch_api"] = True  # mock-a offers /files and /batches; mock-b does not
    settings = {"enabled": True, "max_wait_seconds": 3, "poll_seconds": 0.5,
                "min_slack_seconds": 600, "fallback_slack_seconds": 60, **policy}
    for key, value in settings.items():
        stack.overrides[f"batch_api.{key}"] = value
    return stack


async def batch_stats(mock: Mock) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(f"{mock.url}/batch-stats") as r:
        return dict(await r.json())


async def committed_to_end(stack: Stack) -> bool:
    """True when the group's committed offset on the source topic is at its end everywhere."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka, group_id=stack.group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(stack.requests, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            if (await consumer.committed(tp) or 0) < ends[tp]:
                return False
        return True
    finally:
        await consumer.stop()


async def chat_calls(mocks: list[Mock]) -> int:
    """Synchronous /v1/chat/completions calls the mocks received."""
    return sum([(await m.stats())["calls"] for m in mocks])


def later(i: int, **kw: Any) -> dict[str, Any]:
    """A request that can wait (priority 8, no deadline)."""
    return request(i, priority=8, **kw)


def normal_price(doc: dict[str, Any]) -> float:
    """What the mock's answer to ``doc`` costs at the normal (synchronous) price."""
    usage = completion_body("gpt-4o-mini", doc["input"])["usage"]
    return float(usage["prompt_tokens"] * PRICE["input_per_mtok"]
                 + usage["completion_tokens"] * PRICE["output_per_mtok"]) / 1e6


async def test_thousands_wait_for_two_jobs_per_partition_while_normal_requests_flow(
    stack: Stack, mocks: list[Mock]
) -> None:
    batch_stack(stack)
    stack.overrides["pricing"] = {"gpt-4o-mini": PRICE}  # batch_discount: the default, 0.5
    await mocks[0].configure(batch_delay_seconds=20)
    async with running(stack):
        n, normal = 5_000, 400
        docs = [later(i) for i in range(n)] + [request(n + i) for i in range(normal)]
        docs.sort(key=lambda d: hash(d["id"]) % 97)  # interleaved in every partition
        await produce(stack.requests, encode(docs))
        async with Collector(stack) as col:
            # While the jobs run: the normal requests answered, the source topic committed.
            deadline = time.monotonic() + 60
            while not (col.distinct() >= normal and await committed_to_end(stack)
                       and (await batch_stats(mocks[0]))["batches_created"] >= PARTITIONS):
                assert time.monotonic() < deadline, "normal requests or commits held back"
                await col.poll()
            mid = await batch_stats(mocks[0])
            assert mid["lines_answered"] == 0, mid  # the jobs are still running
            outs = await col.wait_for(n + normal, timeout=180)
        per_id = Counter(o.value["id"] for o in outs)
        assert set(per_id) == {d["id"] for d in docs} and max(per_id.values()) == 1
        batched = [o.value for o in outs if o.value.get("batch_job")]
        kinds = Counter((o.value["endpoint"], o.value.get("cached"), bool(o.value.get("batch_job")),
                         int(o.value["id"][4:]) < n) for o in outs)
        assert len(batched) == n, kinds
        assert {o["id"] for o in batched} == {f"req-{i}" for i in range(n)}
        assert all(o["status"] == "ok" and o["batch_job"]["id"].startswith("batch-")
                   and o["batch_job"]["submitted_at"] and o["endpoint"] == "mock-a"
                   for o in batched)
        stats = await batch_stats(mocks[0])
        assert stats["batches_created"] <= 2 * PARTITIONS, stats
        assert stats["lines_answered"] == n and stats["lines_failed"] == 0
        calls = await chat_calls(mocks)
        assert calls == normal, "qualifying requests made synchronous calls"
    # every answer carries its cost: from a batch job at half the normal price of its tokens
    by_id = {d["id"]: d for d in docs}
    for o in outs:
        cost, batch = o.value.get("cost"), bool(o.value.get("batch_job"))
        assert cost is not None and cost["currency"] == "USD", o.value
        share = 0.5 if batch else 1.0
        assert abs(cost["total"] - share * normal_price(by_id[o.value["id"]])) <= 1e-11, o.value
        assert abs(cost["input"] + cost["output"] - cost["total"]) <= 1e-12 and cost["saved"] == 0


async def test_coordinator_killed_mid_job_is_resumed_without_resubmission(
    stack: Stack, mocks: list[Mock]
) -> None:
    batch_stack(stack)
    await mocks[0].configure(batch_delay_seconds=15)
    n = 600
    worker = start_worker(stack)
    await worker.ready()
    await produce(stack.requests, encode(later(i) for i in range(n)))
    async with Collector(stack) as col:
        deadline = time.monotonic() + 60
        while (await batch_stats(mocks[0]))["batches_created"] < PARTITIONS:
            assert time.monotonic() < deadline, "the jobs were not created"
            await asyncio.sleep(0.3)
        worker.kill()  # mid-job: every batch created, none finished
        created = (await batch_stats(mocks[0]))["batches_created"]
        async with running(stack):
            outs = await col.wait_for(n, timeout=120)
    per_id = Counter(o.value["id"] for o in outs)
    assert set(per_id) == {f"req-{i}" for i in range(n)} and max(per_id.values()) == 1
    assert all(o.value.get("batch_job") for o in outs)
    stats = await batch_stats(mocks[0])
    assert stats["batches_created"] == created, "a job was submitted twice"
    assert await chat_calls(mocks) == 0


async def test_deadline_before_the_job_ends_is_answered_by_a_normal_call(
    stack: Stack, mocks: list[Mock]
) -> None:
    batch_stack(stack, min_slack_seconds=20, fallback_slack_seconds=15)
    await mocks[0].configure(batch_delay_seconds=12)
    async with running(stack):
        soon = int((time.time() + 22) * 1000)  # qualifies, falls back ~7 s later
        n, urgent = 200, 40
        docs = [later(i) for i in range(n - urgent)]
        docs += [later(i, deadline=soon, batch_api=True) for i in range(n - urgent, n)]
        await produce(stack.requests, encode(docs))
        async with Collector(stack) as col:
            outs = await col.wait_for(n, timeout=120)
            await asyncio.sleep(3)  # the late batch results come and must publish nothing
            for _ in range(5):
                await col.poll()
            outs = col.outputs
        stats = await batch_stats(mocks[0])
        assert stats["lines_answered"] == n, "the urgent requests were not in the job"
    per_id = Counter(o.value["id"] for o in outs)
    assert set(per_id) == {d["id"] for d in docs} and max(per_id.values()) == 1
    by_id = {o.value["id"]: o for o in outs}
    for i in range(n - urgent, n):
        o = by_id[f"req-{i}"]
        assert o.value["status"] == "ok" and not o.value.get("batch_job")
        assert o.timestamp <= soon
    assert all(by_id[f"req-{i}"].value.get("batch_job") for i in range(n - urgent))
    assert await chat_calls(mocks) == urgent


async def test_a_failed_job_sends_its_requests_down_the_normal_path(
    stack: Stack, mocks: list[Mock]
) -> None:
    batch_stack(stack)
    await mocks[0].configure(batch_delay_seconds=1, batch_outcome="failed")
    n = 300
    async with running(stack):
        outs = await answered(stack, (later(i) for i in range(n)))
    per_id = Counter(o.value["id"] for o in outs)
    assert set(per_id) == {f"req-{i}" for i in range(n)} and max(per_id.values()) == 1
    assert all(o.value["status"] == "ok" and not o.value.get("batch_job") for o in outs)
    assert (await batch_stats(mocks[0]))["batches_created"] >= 1
    assert await chat_calls(mocks) == n

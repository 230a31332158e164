"""Issue 12 on the real broker and Redis: records whose values cannot be written back,
interleaved with valid ones, each get exactly one output and never stall their partition."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.harness import Collector, Mock, Stack, produce, start_worker

BIG = 2**64 + 1

# (raw value with {id}, the field its dead letter names)
AWKWARD: list[tuple[bytes, str]] = [
    (b'{"id":"%s","input":"x","metadata":{"n":%d}}' % (b"{id}", BIG), "metadata.n"),
    (b'{"id":"%s","input":"x","metadata":[%d]}' % (b"{id}", -(2**63) - 1), "metadata[0]"),
    (b'{"id":"%s","input":"x","metadata":NaN}', "metadata"),
    (b'{"id":"%s","input":"x","metadata":{"f":1e999}}', "metadata.f"),
    (b'{"id":"%s","input":"x","cache":{"ttl":%d}}' % (b"{id}", BIG), "cache.ttl"),
    (b'{"id":"%s","input":"x","cache":{"ttl":99999999999}}', "cache.ttl"),
    (b'{"id":"%s","input":"x","deadline":%d}' % (b"{id}", BIG), "deadline"),
    (b'{"id":"%s","input":"x","deadline":1700000000}', "deadline"),
    (b'{"id":"%s","input":"x","params":{"seed":%d}}' % (b"{id}", BIG), "params.seed"),
    (b'{"id":"%s","messages":[{"role":"user","content":"x","n":%d}]}' % (b"{id}", BIG),
     "messages[0].n"),
]


def _awkward(i: int) -> tuple[bytes, str]:
    raw, field = AWKWARD[i % len(AWKWARD)]
    return raw.replace(b"%s", f"awk-{i}".encode()).replace(b"{id}", f"awk-{i}".encode()), field


async def _committed_reach_the_end(stack: Stack, timeout: float) -> dict[int, tuple[int, int]]:
    """Wait until the group's committed offset of every requests partition is its end offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka)
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
    await consumer.start()
    await admin.start()
    try:
        tps = [TopicPartition(stack.requests, p)
               for p in sorted(consumer.partitions_for_topic(stack.requests) or ())]
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while True:
            got = await admin.list_consumer_group_offsets(stack.group)
            seen = {tp.partition: (got[tp].offset if tp in got else -1, ends[tp]) for tp in tps}
            if all(c == e for c, e in seen.values()) or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
        await consumer.stop()


async def test_awkward_values_one_output_each_and_commits_reach_the_end(
    stack: Stack, mocks: list[Mock]
) -> None:
    worker = start_worker(stack)
    try:
        await worker.ready()
        n = 300
        values: list[bytes] = []
        expect: dict[str, str | None] = {}  # id -> the field its dead letter names, None: answered
        for i in range(n):
            raw, field = _awkward(i)
            values.append(raw)
            expect[f"awk-{i}"] = field
            doc: dict[str, Any] = {"id": f"ok-{i}", "input": f"valid prompt {i}",
                                   "metadata": {"edge": [2**63 - 1, -(2**63), 1e308]}}
            values.append(orjson.dumps(doc))
            expect[f"ok-{i}"] = None
        await produce(stack.requests, values, keys=[f"k{i % 7}".encode() for i in range(2 * n)])
        async with Collector(stack) as col:
            outs = await col.wait_for(2 * n, timeout=180)
        per_id = Counter(o.value.get("id") for o in outs)
        assert set(per_id) == set(expect), set(per_id) ^ set(expect)
        assert all(c == 1 for c in per_id.values()), [k for k, c in per_id.items() if c > 1][:5]
        for o in outs:
            field = expect[o.value["id"]]
            if field is None:
                assert o.topic == stack.responses and o.value["status"] == "ok", o.value
                assert o.value["metadata"] == {"edge": [2**63 - 1, -(2**63), 1e308]}
            else:
                assert o.topic == stack.dlq, o.value
                assert o.value["error"]["type"] == "validation"
                assert o.value["error"]["message"].startswith(f"{field}: "), o.value["error"]
        committed = await _committed_reach_the_end(stack, timeout=60)
        assert all(c == e for c, e in committed.values()), f"stalled partitions: {committed}"
        assert worker.alive(), "the worker died"
        log = worker.log.read_text(errors="replace")
        assert "Task exception was never retrieved" not in log and "Traceback" not in log
    finally:
        assert worker.stop() == 0

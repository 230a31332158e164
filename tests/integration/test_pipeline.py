"""The core pipeline on the real broker and Redis, with workers as separate processes."""

from __future__ import annotations

import asyncio
import base64
import random
from collections import Counter

import orjson

from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    answered,
    encode,
    kill_when_half_answered,
    produce,
    request,
    running,
    start_worker,
)


async def test_ten_thousand_requests_one_output_each(stack: Stack, mocks: list[Mock]) -> None:
    async with running(stack) as [worker]:
        n = 10_000
        outs = await answered(stack, (request(i) for i in range(n)), timeout=240)
        per_id = Counter(o.value["id"] for o in outs)
        assert len(per_id) == n and set(per_id) == {f"req-{i}" for i in range(n)}
        assert len(outs) == n, f"{len(outs) - n} duplicate outputs"
        assert all(o.topic == stack.responses and o.value["status"] == "ok" for o in outs)
        sample = outs[0].value
        assert sample["output"].startswith("mock answer") and sample["usage"]["total_tokens"] > 0
        assert sample["endpoint"] in ("mock-a", "mock-b") and sample["attempts"] == 1
        assert worker.alive()


async def test_sigkill_halfway_loses_nothing(stack: Stack, mocks: list[Mock]) -> None:
    for m in mocks:
        await m.configure(latency_ms=20)
    n = 10_000
    await produce(stack.requests, encode(request(i) for i in range(n)))
    async with Collector(stack) as col:
        await kill_when_half_answered(stack, col, n)
        before = col.distinct()
        assert before < n, "the worker finished before it could be killed"
        async with running(stack):
            outs = await col.wait_for(n, timeout=240)
    ids = {o.value["id"] for o in outs}
    assert ids == {f"req-{i}" for i in range(n)}
    assert all(o.value["status"] == "ok" for o in outs)


def _malformed(rng: random.Random, i: int) -> bytes:
    kind = i % 8
    if kind == 0:
        return b"{not json " + str(i).encode()
    if kind == 1:
        return b"\xff\xfe\xfa invalid utf-8 " + str(i).encode()
    if kind == 2:
        return orjson.dumps({"id": f"bad-{i}", "input": 42})
    if kind == 3:
        return orjson.dumps({"id": f"bad-{i}"})
    if kind == 4:
        return orjson.dumps({"id": f"bad-{i}", "input": "x", "priority": "urgent"})
    if kind == 5:
        return b"[" * 3000 + b"]" * 3000
    if kind == 6:
        return orjson.dumps({"id": f"bad-{i}", "input": "x" * 1_100_000})[:900_000]
    return orjson.dumps(["a", "list", i])


async def test_malformed_records_become_validation_dead_letters(
    stack: Stack, mocks: list[Mock]
) -> None:
    rng = random.Random(3)
    values: list[bytes] = []
    bad_positions = set()
    for i in range(2000):
        if i % 2:
            bad_positions.add(len(values))
            values.append(_malformed(rng, i))
        else:
            values.append(orjson.dumps(request(i)))
    stack.overrides["limits.max_value_bytes"] = 100_000
    async with running(stack) as [worker]:
        await produce(stack.requests, values)
        async with Collector(stack) as col:
            outs = await col.wait_for(2000, timeout=180)
        dead = [o for o in outs if o.topic == stack.dlq]
        ok = [o for o in outs if o.topic == stack.responses]
        assert len(ok) == 1000 and len(dead) == 1000
        for o in dead:
            v = o.value
            assert v["error"]["type"] == "validation" and v["error"]["message"]
            assert v["source"]["topic"] == stack.requests and v["attempts"] == 0
            assert o.headers["__connect.errors.topic"] == stack.requests.encode()
            assert int(o.headers["__connect.errors.offset"]) == v["source"]["offset"]
            if v.get("raw_encoding") == "base64":
                assert base64.b64decode(v["raw"]).startswith(b"\xff\xfe")
        assert worker.alive()
        assert "Traceback" not in worker.log.read_text(errors="replace")


async def test_keys_are_kept_and_sigterm_exits_zero(stack: Stack, mocks: list[Mock]) -> None:
    worker = start_worker(stack)
    await worker.ready()
    await produce(stack.requests, encode(request(i) for i in range(50)),
                  keys=[f"k{i}".encode() for i in range(50)])
    async with Collector(stack) as col:
        outs = await col.wait_for(50)
    assert {o.key for o in outs} == {f"k{i}".encode() for i in range(50)}
    assert all(o.key == f"k{o.value['id'][4:]}".encode() for o in outs)
    assert worker.stop() == 0
    await asyncio.sleep(0)

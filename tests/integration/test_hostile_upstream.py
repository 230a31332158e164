"""A hostile upstream through the real broker and Redis: one output per request, always.

One mock answers with everything an upstream should not send (non-finite, huge, negative and
garbage wait headers on its 429s; invalid usage; no ``choices``; HTML; a completion as
``text/html``; a body over ``max_response_bytes``), the other is healthy. Every request gets
exactly one output, no traceback reaches the log, and once the hostile mock behaves it gets
traffic again within its (capped) cooldown.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.integration.harness import Collector, Mock, Stack, Worker, encode, produce, request, running


async def _state(worker: Worker, endpoint: str) -> str:
    """The endpoint's state as the worker's /metrics reports it."""
    for line in (await worker.metrics_text()).splitlines():
        if line.startswith("llm_streams_endpoint_state{") and f'endpoint="{endpoint}"' in line \
                and line.endswith(" 1.0"):
            return line.split('state="')[1].split('"')[0]
    return "unknown"


HOSTILE_HEADERS = [
    {"Retry-After": "NaN"}, {"Retry-After": "inf"}, {"Retry-After": "-5"},
    {"Retry-After": "1e999"}, {"Retry-After": "99999999"}, {"Retry-After": "soon"},
    {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, {"retry-after-ms": "nan"},
    {"x-ratelimit-reset-requests": "nan", "x-ratelimit-reset-tokens": "inf"},
    {"x-ratelimit-reset-tokens": "1e308s"}, {"x-ratelimit-reset-requests": "-1m"},
]
HOSTILE_MIX = {"429": 0.15, "bad_usage": 0.15, "no_choices": 0.05, "not_json": 0.05,
               "wrong_type": 0.05, "oversized": 0.03}


async def test_hostile_upstream_one_output_each_and_recovery(
    stack: Stack, mocks: list[Mock]
) -> None:
    hostile, good = mocks
    stack.endpoints = [
        {"name": "hostile", "url": f"{hostile.url}/v1", "weight": 1, "timeout_seconds": 5,
         "max_response_bytes": 262_144},
        {"name": "good", "url": f"{good.url}/v1", "weight": 1, "timeout_seconds": 5},
    ]
    stack.overrides["cache.enabled"] = False
    stack.overrides["retry.max_retry_after_ms"] = 2_000
    stack.overrides["retry.cooldown_seconds"] = 1.0
    await hostile.configure(faults=HOSTILE_MIX, error_headers=HOSTILE_HEADERS,
                            oversize_bytes=1_000_000)
    async with running(stack) as [worker]:
        n = 400
        await produce(stack.requests, encode(request(i) for i in range(n)))
        async with Collector(stack) as col:
            outs = await col.wait_for(n, timeout=180)
            per_id = Counter(o.value["id"] for o in outs)
            assert len(per_id) == n and set(per_id.values()) == {1}, "one output per request"
            dead = [o.value for o in outs if o.topic == stack.dlq]
            assert {d["error"]["type"] for d in dead} <= {"upstream"}, dead[:3]
            assert all(d["endpoints"] == ["hostile"] for d in dead)
            ok = [o.value for o in outs if o.topic == stack.responses]
            zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            assert any(o["endpoint"] == "hostile" and o["usage"] == zero for o in ok)
            assert all(min(o["usage"].values()) >= 0 for o in ok)
            stats = await hostile.stats()
            assert stats["by_fault"].get("429", 0) > 10 and stats["by_fault"].get("bad_usage")

            # the hostile mock behaves again: it gets traffic within the capped cooldown
            await hostile.configure(faults={}, error_headers=[])
            await asyncio.sleep(2.5)
            before = (await hostile.stats())["ok"]
            for wave in range(5):  # in waves: one probe first, then its share
                first = n + 20 * wave
                await produce(stack.requests, encode(request(i) for i in range(first, first + 20)))
                await col.wait_for(first + 20, timeout=60)
                await asyncio.sleep(0.3)
        later = [o.value for o in col.outputs if int(o.value["id"][4:]) >= n]
        assert len(later) == 100 and all(o["status"] == "ok" for o in later)
        # a cooldown stuck at NaN would give it nothing at all
        assert (await hostile.stats())["ok"] - before >= 10, "the hostile endpoint recovered"
        assert await _state(worker, "hostile") == "healthy"
    log = worker.log.read_text()
    assert "Traceback" not in log and "cooldown sync failed" not in log
    assert "invalid usage" in log

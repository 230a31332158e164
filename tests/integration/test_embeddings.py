"""Embedding requests on the real broker and Redis, the mock at 20 ms per /embeddings call.

- many requests (``EMBED_IT_SIZE``, default 10,000; the issue's 100,000 runs with
  ``EMBED_IT_SIZE=100000``): exactly one output each, each vector the mock's for its input;
- one input the mock refuses inside a full batch: only that record is dead-lettered, after at
  most 2 x log2(batch size) + 1 calls;
- ``rpm`` and ``tpm`` hold at the mock with 3 workers, a batch call counting as one request
  and its tokens;
- a repeated input is a cache hit; tenants stay isolated.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mockllm.embeddings import input_tokens, vector_base64, vector_for
from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    StartMock,
    answered,
    encode,
    produce,
    running,
    window_sums,
)

pytestmark = pytest.mark.integration

SIZE = int(os.environ.get("EMBED_IT_SIZE", "10000"))


def _emb(i: int | str, text: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": f"e{i}", "kind": "embedding", "model": "emb",
            "input": text if text is not None else f"document {i} about topic {len(str(i)) * 31 % 97}",
            **kw}


@pytest.fixture
async def mock(mock_llm: StartMock) -> Mock:
    """The mock endpoint, 20 ms per call."""
    return await mock_llm("--latency-ms", "20")


def _stack(tmp: Path, mock: Mock, name: str = "s", **endpoint: Any) -> Stack:
    ep = {"name": "ep", "url": f"{mock.url}/v1", "timeout_seconds": 10, **endpoint}
    stack = Stack(tmp / name, endpoints=[ep])
    stack.tmp.mkdir(parents=True, exist_ok=True)
    return stack


async def test_many_embedding_requests_each_get_their_own_vector(tmp_path: Path,
                                                                 mock: Mock) -> None:
    stack = _stack(tmp_path, mock, max_concurrency=4)
    async with running(stack):
        docs = [_emb(i) for i in range(SIZE)]
        docs[1] = _emb(1, params={"encoding_format": "base64", "dimensions": 8})
        started = time.monotonic()
        outs = await answered(stack, docs, timeout=60 + SIZE / 50)
        took = time.monotonic() - started
        stats = await mock.stats()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for o in outs:
        by_id.setdefault(o.value["id"], []).append(o.value)
    assert len(by_id) == SIZE and all(len(v) == 1 for v in by_id.values())
    for doc in docs:
        (rec,) = by_id[doc["id"]]
        assert rec["status"] == "ok" and rec["kind"] == "embedding", rec
        if doc["id"] == "e1":
            assert rec["embedding"] == vector_base64(doc["input"], 8) and rec["dimensions"] == 8
        else:
            assert rec["embedding"] == vector_for(doc["input"]) and rec["dimensions"] == 16
        assert rec["attempts"] == 1 and rec["output"] is None
    batches = [r[0]["batch_size"] for r in by_id.values()]
    print(f"\n{SIZE} embeddings in {took:.1f} s ({SIZE / took:.0f}/s): {stats['calls']} calls, "
          f"mean batch {sum(batches) / len(batches):.0f}")
    assert stats["calls"] <= SIZE / 10  # batched: far fewer calls than records
    assert stats["duplicate_calls"] == 0


async def test_a_refused_input_is_dead_lettered_alone(tmp_path: Path, mock: Mock) -> None:
    n = 256
    docs = [_emb(i) for i in range(n)]
    bad = docs[101]
    await mock.configure(refuse_inputs=[bad["input"]])
    stack = _stack(tmp_path, mock)
    stack.overrides["embeddings.max_wait_ms"] = 2000  # gather the whole batch
    async with running(stack):
        outs = await answered(stack, docs, timeout=120)
        calls = (await mock.stats(log=True))["calls_log"]
    letters = [o.value for o in outs if o.topic == stack.dlq]
    assert [d["id"] for d in letters] == [bad["id"]]
    (letter,) = letters
    assert letter["error"]["type"] == "upstream" and letter["error"]["status"] == 400
    assert letter["attempts"] == sum(bad["input"] in c["inputs"] for c in calls)
    ok = [o.value for o in outs if o.topic == stack.responses]
    assert len(ok) == n - 1 and all(r["status"] == "ok" for r in ok)
    first = max(len(c["inputs"]) for c in calls)
    print(f"\nbatch sizes {[len(c['inputs']) for c in calls]}")
    assert len(calls) <= 2 * math.ceil(math.log2(n)) + 1, [len(c["inputs"]) for c in calls]
    assert first > n // 2  # the refused input did come in a (nearly) full batch


@pytest.mark.parametrize("limit", ["rpm", "tpm"])
async def test_limits_hold_with_three_workers_a_batch_counting_once(tmp_path: Path, mock: Mock,
                                                                    limit: str) -> None:
    # rpm 240: four calls a second; tpm 60,000: 1,000 tokens a second (a batch at most that).
    endpoint = {"rpm": 240} if limit == "rpm" else {"tpm": 60_000}
    stack = _stack(tmp_path, mock, **endpoint)
    stack.overrides["cache.enabled"] = False
    async with running(stack, 3, settle=3.0, clean_exit=False):  # settle: the group rebalances
        docs = [_emb(i) for i in range(12_000 if limit == "rpm" else 4_000)]
        await produce(stack.requests, encode(docs))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            s = await mock.stats()
            if s["first_call"] is not None and s["last_call"] - s["first_call"] >= 8:
                break
            await asyncio.sleep(0.5)
        stats = await mock.stats(log=True)
    calls = [c for c in stats["calls_log"] if c["t"] >= stats["first_call"] + 0.25]
    assert all(c["status"] == 200 for c in calls)
    times = [c["t"] for c in calls]
    sizes = [len(c["inputs"]) for c in calls]
    tokens = [sum(input_tokens(t) for t in c["inputs"]) for c in calls]
    print(f"\n{limit}: {len(calls)} calls, inputs per call {min(sizes)}-{max(sizes)}, "
          f"mock stalls {len(stats['stalls_log'])}")
    # Every 1 s window, a stall of the mock or not (calls it stamped late only add to a window):
    # one request of measurement slack, as test_rate_quota allows inside `make test`.
    if limit == "rpm":
        most, _, _ = window_sums(times, [1] * len(times), 1.0, [])
        assert most <= 4 + 1, most
        assert sum(sizes) / len(sizes) > 50  # each call carried many inputs
    else:
        most, _, _ = window_sums(times, tokens, 1.0, [])
        assert max(tokens) <= 1000  # a batch holds at most one second of tpm
        assert most <= 1000 + 2 * max(tokens), most
    costs = [1] * len(times) if limit == "rpm" else tokens
    served = sum(costs[:-1]) / (times[-1] - times[0])  # each call's share of the span up to the next
    print(f"served {served:.1f} {limit[0]}ps ({limit} / 60 = {4 if limit == 'rpm' else 1000})")


async def test_a_repeated_input_is_a_cache_hit_and_tenants_are_isolated(tmp_path: Path,
                                                                          mock: Mock) -> None:
    stack = _stack(tmp_path, mock)
    text = "the same text, embedded again"
    async with running(stack):
        async with Collector(stack) as col:
            await produce(stack.requests, encode([_emb("a1", text, tenant="a")]))
            await col.wait_for(1)
            await produce(stack.requests, encode([_emb("a2", text, tenant="a"),
                                                  _emb("b1", text, tenant="b")]))
            outs = await col.wait_for(3)
        calls = (await mock.stats(log=True))["calls_log"]
    recs = {o.value["id"]: o.value for o in outs}
    assert recs["ea1"]["cached"] is False and recs["ea2"]["cached"] is True
    assert recs["ea2"]["endpoint"] is None and recs["ea2"]["attempts"] == 0
    assert recs["eb1"]["cached"] is False  # tenant b never gets tenant a's entry
    assert all(r["embedding"] == vector_for(text) for r in recs.values())
    assert sum(c["inputs"].count(text) for c in calls) == 2

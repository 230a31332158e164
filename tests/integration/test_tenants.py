"""Tenants and cost end to end: real broker, real Redis, worker processes, the project's mock
(whose ``usage`` is known for every prompt and whose log has every call's arrival and prompt).

- every response's ``cost`` equals the price table applied to the mock's usage (1e-9), cached
  and coalesced answers report what they saved, and the cost counter equals the sum;
- a 20,000-token-per-minute budget with ``wait``, flooded at 10x by 3 workers: never more than
  20,000 tokens in any calendar minute at the mock, every request answered. To keep the test
  short the flood (9 s at 10x the budget's rate) starts 18 s before a minute ends: the first
  minute serves 20,000 tokens, the rest waits for the next minute (the window is a real
  calendar minute; the test waits up to a minute for the right second);
- the same with ``reject``: the refused requests are ``budget`` dead letters, the admitted ones
  stay within the budget;
- fair share: a small tenant behind a flood, and 3:1 weights, at a 200 req/s limit.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mockllm.server import completion_body
from streams.config_tenants import PriceConfig
from streams.pricing import Pricing
from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    StartMock,
    answered,
    encode,
    produce,
    running,
)

pytestmark = pytest.mark.integration

PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.6}  # per million tokens
BUDGET = 20_000


def _prompt(i: int, size: int = 400) -> str:
    head = f"tenant request {i} "
    return head + "x" * (size - len(head))


def _usage(prompt: str) -> dict[str, int]:
    return dict(completion_body("m", prompt)["usage"])


def _max_tokens(prompt: str) -> int:
    """max_tokens that makes the worker's estimate (chars/4 + 7 + max_tokens) exact."""
    return _usage(prompt)["total_tokens"] - (len(prompt) // 4 + 7)


def _stack(tmp: Path, mock: Mock, **overrides: Any) -> Stack:
    ep = {"name": "ep", "url": f"{mock.url}/v1", "timeout_seconds": 10}
    return Stack(tmp, endpoints=[ep], overrides=overrides)


async def _collect(stack: Stack, n: int, timeout: float) -> list[dict[str, Any]]:
    async with Collector(stack) as col:
        await col.wait_for(n, timeout=timeout)
        return [o.value for o in col.outputs]


async def test_costs_in_ten_thousand_responses(tmp_path: Path, mock_llm: StartMock) -> None:
    stack = _stack(tmp_path, await mock_llm(), pricing={"m": PRICE}, tenants={"a": {}})
    async with running(stack, clean_exit=False) as [worker]:
        docs = [{"id": f"c{i}", "input": _prompt(i, 40 + i % 300), "model": "m", "tenant": "a"}
                for i in range(10_000)]
        # 200 repeats of earlier prompts: answered from the cache, each saving its price
        docs += [{"id": f"r{i}", "input": _prompt(i, 40 + i % 300), "model": "m", "tenant": "a"}
                 for i in range(200)]
        first = await answered(stack, docs[:10_000], timeout=240)
        outs = [o.value for o in await answered(stack, docs[10_000:], n=10_200, timeout=120)]
        paid = await worker.metric("llm_streams_cost_total")
        saved = await worker.metric("llm_streams_cost_saved_total")
    assert len(first) >= 10_000
    pricing = Pricing({"m": PriceConfig(**PRICE)})
    by_id = {o["id"]: o for o in outs}
    assert len(by_id) == 10_200 and all(o["status"] == "ok" for o in by_id.values())
    total = total_saved = 0.0
    for doc in docs:
        out = by_id[doc["id"]]
        usage = _usage(doc["input"])
        exact = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1e6
        cost = out["cost"]
        assert cost["currency"] == "USD"
        if out["cached"]:
            assert cost["total"] == 0 and abs(cost["saved"] - exact) <= 1e-9, out
            total_saved += cost["saved"]
        else:
            assert abs(cost["total"] - exact) <= 1e-9 and cost["saved"] == 0, out
            assert abs(cost["input"] + cost["output"] - cost["total"]) <= 1e-12
            total += cost["total"]
        expect = pricing.price("m", None, usage)
        assert expect is not None and abs(expect.total - exact) <= 1e-9
    assert sum(o["cached"] for o in by_id.values()) >= 200
    assert abs(paid - total) <= 1e-9 and abs(saved - total_saved) <= 1e-9, (paid, total)


async def _align(second: float, latest: float) -> None:
    """Sleep until ``second`` of a calendar minute, unless we are within [second, latest)."""
    s = time.time() % 60
    if not second <= s < latest:
        await asyncio.sleep((second - s) % 60)


def _per_minute(calls: list[dict[str, Any]]) -> Counter[int]:
    tokens: Counter[int] = Counter()
    for c in calls:
        if c["status"] == 200:
            tokens[int(c["t"] // 60)] += _usage(c["prompt"])["total_tokens"]
    return tokens


def _flood(n: int, tenant: str) -> list[dict[str, Any]]:
    return [{"id": f"{tenant}{i}", "input": (p := _prompt(i)), "model": "m", "tenant": tenant,
             "params": {"max_tokens": _max_tokens(p)}} for i in range(n)]


async def _produce_over(topic: str, docs: list[dict[str, Any]], seconds: float) -> None:
    """Produce ``docs`` evenly over ``seconds`` (ten batches a second)."""
    steps = max(int(seconds * 10), 1)
    start = time.monotonic()
    for k in range(steps):
        await produce(topic, encode(docs[k * len(docs) // steps:(k + 1) * len(docs) // steps]))
        await asyncio.sleep(max(start + (k + 1) / 10 - time.monotonic(), 0))


@pytest.mark.parametrize("policy", ["wait", "reject"])
async def test_a_token_budget_holds_across_three_workers(tmp_path: Path, policy: str,
                                                        mock_llm: StartMock) -> None:
    mock = await mock_llm("--latency-ms", "20")
    tenants = {"flood": {"budgets": [{"window": "minute", "tokens": BUDGET}],
                         "on_exhausted": policy}}
    stack = _stack(tmp_path, mock, **{"cache.enabled": False}, pricing={"m": PRICE},
                   tenants=tenants)
    async with running(stack, 3, settle=3.0, clean_exit=False):  # settle: the group rebalances
        docs = _flood(250, "flood")  # ~120 tokens each: 30,000 tokens, 1.5 minutes' budget
        assert 29_000 < sum(_usage(d["input"])["total_tokens"] for d in docs) < 31_000
        # 10x the budget's rate (200,000 tokens a minute) for 9 s, ending 9 s before the minute
        await _align(42.0, 43.0)
        await _produce_over(stack.requests, docs, 9.0)
        outs = await _collect(stack, len(docs), timeout=120)
        stats = await mock.stats(log=True)
    per_minute = _per_minute(stats["calls_log"])
    print(f"\n{policy}: tokens per calendar minute at the mock: {dict(per_minute)}")
    assert max(per_minute.values()) <= BUDGET, per_minute
    letters = [o for o in outs if o.get("error")]
    answered = [o for o in outs if o.get("status") == "ok"]
    assert len({o["id"] for o in outs}) == len(docs)
    if policy == "wait":
        assert not letters and len(answered) == len(docs)
        assert len(per_minute) == 2  # the budget made the rest wait for the next minute
    else:
        assert letters and all(o["error"]["type"] == "budget" for o in letters)
        assert all(o["error"]["retryable"] for o in letters)
        assert len(per_minute) == 1 and len(answered) + len(letters) == len(docs)
        assert sum(per_minute.values()) >= BUDGET - 500  # admitted up to the budget


FLOOD = int(os.environ.get("FAIR_FLOOD", "50000"))


async def _latencies(stack: Stack, ids: set[str], timeout: float) -> list[int]:
    async with Collector(stack) as col:
        deadline = time.monotonic() + timeout
        while not ids <= col.ids() and time.monotonic() < deadline:
            await col.poll()
        return [o.value["latency_ms"] for o in col.outputs if o.value.get("id") in ids]


async def test_fair_share_a_small_tenant_behind_a_flood(tmp_path: Path,
                                                       mock_llm: StartMock) -> None:
    """A floods, then B sends 200 at 20/s into the same partitions (same priority, equal
    weight), one worker at 200 req/s: B's median wait at most 2x its median when alone."""
    stack = _stack(tmp_path, await mock_llm("--latency-ms", "5"),
                   **{"cache.enabled": False, "limits.max_requests_per_second": 200})
    async with running(stack, clean_exit=False) as [worker]:
        alone = [{"id": f"b-alone{i}", "input": f"b alone {i}", "model": "m", "tenant": "b"}
                 for i in range(200)]
        await _produce_over(stack.requests, alone, 10.0)
        base = await _latencies(stack, {d["id"] for d in alone}, 60)
        flood = [{"id": f"a{i}", "input": f"a {i}", "model": "m", "tenant": "a"}
                 for i in range(FLOOD)]
        started = time.monotonic()
        await produce(stack.requests, encode(flood))
        # the worker reads the whole flood ahead (limits.max_queued): B then lands behind it
        # in Kafka but not in the worker
        while await worker.metric("llm_streams_records_consumed_total") < FLOOD + 200:
            assert time.monotonic() - started < 120, "the flood was not read ahead"
            await asyncio.sleep(0.5)
        print(f"\nflood of {FLOOD} read in {time.monotonic() - started:.1f} s")
        small = [{"id": f"b{i}", "input": f"b {i}", "model": "m", "tenant": "b"}
                 for i in range(200)]
        await _produce_over(stack.requests, small, 10.0)
        behind = await _latencies(stack, {d["id"] for d in small}, 60)
    assert len(base) == len(behind) == 200
    m_alone, m_flood = statistics.median(base), statistics.median(behind)
    print(f"\nB median latency alone {m_alone:.0f} ms, behind a {FLOOD}-request flood "
          f"{m_flood:.0f} ms ({m_flood / m_alone:.1f}x)")
    # FIFO would put B behind the whole flood: FLOOD / 200 s
    assert m_flood <= 2 * m_alone + 50, (m_alone, m_flood)


async def test_weights_3_to_1_share_the_capacity(tmp_path: Path, mock_llm: StartMock) -> None:
    mock = await mock_llm("--latency-ms", "5")
    stack = _stack(tmp_path, mock, **{"cache.enabled": False,
                                      "limits.max_requests_per_second": 200},
                   tenants={"a": {"weight": 3}, "b": {"weight": 1}})
    async with running(stack, clean_exit=False):
        docs = [{"id": f"{t}{i}", "input": f"{t} {i}", "model": "m", "tenant": t}
                for i in range(3000) for t in ("a", "b")]
        await produce(stack.requests, encode(docs))
        await asyncio.sleep(12.0)
        stats = await mock.stats(log=True)
    calls = [c for c in stats["calls_log"] if c["status"] == 200]
    start = calls[0]["t"] + 2.0  # both backlogged from here on (the reading has caught up)
    window = [c for c in calls if start <= c["t"] < start + 8.0]
    served = Counter(c["prompt"].split()[0] for c in window)
    share = served["a"] / sum(served.values())
    print(f"\n3:1 weights: served {dict(served)} ({share:.1%} to a)")
    assert 0.70 <= share <= 0.80 and 0.20 <= 1 - share <= 0.30, served

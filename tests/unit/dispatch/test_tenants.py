"""Tenants through the whole dispatcher on virtual time: fair share under a rate limit, a
tenant's max_inflight, budgets that wait or reject (dead letter ``budget``), windows."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

from streams.contract import Completion, Request
from streams.errors import BudgetExceeded, DispatchFailed
from tests.fakes.vtime import EPOCH, VirtualClock, run
from tests.unit.dispatch.test_dispatcher import _ep, _make


def _req(i: int, tenant: str | None, **kw: Any) -> Request:
    return Request(id=f"{tenant}-{i}", input=f"{tenant} {i}", model="m", tenant=tenant, **kw)


def test_fair_share_3_to_1_under_a_rate_limit_and_a_small_tenant_is_not_starved() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a")], latency=0.01,
                         limits={"max_requests_per_second": 100},
                         tenants={"big": {"weight": 3}, "small": {"weight": 1}})
        async with d:
            tasks = [asyncio.create_task(d.dispatch(_req(i, t)))
                     for i in range(600) for t in ("big", "small")]
            await asyncio.sleep(4.0)  # both backlogged all along
            served = Counter(prompt.split()[0] for _, _, prompt in up.calls)
            share = served["big"] / sum(served.values())
            assert 0.70 <= share <= 0.80, served
            late = asyncio.create_task(d.dispatch(_req(0, "late")))
            start = clock()
            await late
            # FIFO would put it behind ~800 queued requests (8 s), and the slots the rate
            # limiter granted ahead (0.25 s) would hold it too; in fair-queue order it goes
            # after the grants tagged within its one step (weight 1 of 5: ~5 slots)
            waited = clock() - start
            assert waited < 0.1, waited
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    run(main)


def test_tenant_max_inflight_caps_only_that_tenant() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, [_ep("a")], latency=1.0, limits={"max_inflight": 10},
                         tenants={"capped": {"max_inflight": 2}})
        async with d:
            capped = [asyncio.create_task(d.dispatch(_req(i, "capped"))) for i in range(6)]
            other = [asyncio.create_task(d.dispatch(_req(i, "other"))) for i in range(6)]
            await asyncio.sleep(0.5)
            active = Counter(p.split()[0] for _, _, p in up.calls)
            assert active == {"capped": 2, "other": 6}
            results = await asyncio.gather(*capped, *other)
        assert all(isinstance(r, Completion) for r in results)
        assert clock.elapsed() >= 3.0  # 6 capped calls, 2 at a time, 1 s each
    run(main)


def _minute(clock: VirtualClock) -> float:
    return math.ceil(clock() / 60) * 60


def test_budget_wait_spreads_calls_over_calendar_minutes() -> None:
    async def main(clock: VirtualClock) -> None:
        await asyncio.sleep(_minute(clock) - clock() + 1)
        d, up, _ = _make(clock, [_ep("a")], latency=0.01, tenants={"t": {
            "budgets": [{"window": "minute", "tokens": 100}], "on_exhausted": "wait"}})
        async with d:
            # estimate: 2 prompt chars -> 0 + 4 + 3, plus max_tokens 33 = 40; usage says 10
            results = await asyncio.gather(*(d.dispatch(_req(i, "t", params={"max_tokens": 33}))
                                             for i in range(30)))
        assert all(isinstance(r, Completion) for r in results)
        per_minute = Counter(int((EPOCH + t) // 60) for t, _, _ in up.calls)
        # 100 tokens/min at 10 used each (refunds make room): 10 per minute, never more
        assert max(per_minute.values()) <= 10 and len(per_minute) >= 3
    run(main)


def test_budget_reject_dead_letters_and_larger_than_a_window_never_runs() -> None:
    async def main(clock: VirtualClock) -> None:
        await asyncio.sleep(_minute(clock) - clock() + 1)
        d, up, registry = _make(clock, [_ep("a")], latency=0.5, tenants={
            "t": {"budgets": [{"window": "minute", "tokens": 100}], "on_exhausted": "reject"}})
        async with d:
            results = await asyncio.gather(
                *(d.dispatch(_req(i, "t", params={"max_tokens": 33})) for i in range(5)),
                return_exceptions=True)
            huge = await asyncio.gather(d.dispatch(_req(9, "t", params={"max_tokens": 500})),
                                        return_exceptions=True)
        ok = [r for r in results if isinstance(r, Completion)]
        refused = [r for r in results if isinstance(r, DispatchFailed)]
        assert len(ok) == 2 and len(refused) == 3  # 40 + 40 reserved; the third does not fit
        assert all(isinstance(r.error, BudgetExceeded) and r.error.dlq_type == "budget"
                   for r in refused)
        assert isinstance(huge[0], DispatchFailed) and not huge[0].error.retryable
        assert len(up.calls) == 2
        assert registry.get_sample_value("llm_streams_dispatch_total", {"outcome": "budget"}) == 4
    run(main)

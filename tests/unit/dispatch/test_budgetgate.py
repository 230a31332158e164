"""Waiting for a budget on virtual time: wait for the next window in line, reject, deadlines,
refunds that wake the head, the request that could never fit."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from streams.config import load_settings
from streams.dispatch.budgetgate import BudgetGate, Hold
from streams.dispatch.budgets import Budgets
from streams.errors import BudgetExceeded
from tests.fakes.vtime import EPOCH, VirtualClock, run

MSG = [{"role": "user", "content": "x" * 400}]  # ~100 prompt tokens + 4 + 3 framing


def _gate(clock: VirtualClock, policy: str = "wait", tokens: int = 1000) -> tuple[BudgetGate,
                                                                                   Budgets]:
    settings = load_settings(environ={}, tenants={"a": {
        "budgets": [{"window": "minute", "tokens": tokens}], "on_exhausted": policy}})
    budgets = Budgets(settings, None, clock=clock)
    return BudgetGate(settings, budgets, clock=clock), budgets


def _hold(gate: BudgetGate, max_tokens: int, priority: int = 5) -> Hold:
    hold = gate.hold("a", "m", MSG, {"max_tokens": max_tokens}, priority)
    assert hold is not None and hold.tokens == 107 + max_tokens
    return hold


def _minute_start() -> float:
    return math.ceil(EPOCH / 60) * 60


def test_waiters_pass_in_order_when_the_window_resets() -> None:
    async def main(clock: VirtualClock) -> None:
        await asyncio.sleep(_minute_start() - clock() + 1)  # 1 s into a minute
        gate, _ = _gate(clock)
        holds = [_hold(gate, 393) for _ in range(5)]  # 500 tokens each: two per minute
        done: list[tuple[int, float]] = []

        async def one(i: int) -> None:
            assert await gate.reserve(holds[i], None)
            done.append((i, clock() - _minute_start()))
        await asyncio.gather(*(one(i) for i in range(5)))
        assert [i for i, _ in done] == [0, 1, 2, 3, 4]  # FIFO in the tenant's line
        assert [int(t // 60) for _, t in done] == [0, 0, 1, 1, 2]  # two per calendar minute
    run(main)


def test_unknown_tenant_has_no_hold_and_a_refund_wakes_the_head() -> None:
    async def main(clock: VirtualClock) -> None:
        await asyncio.sleep(_minute_start() - clock() + 1)
        gate, _ = _gate(clock)
        assert gate.hold("free", "m", MSG, {}, 5) is None  # no budgets: nothing to hold
        first, second = _hold(gate, 793), _hold(gate, 393)  # 900 + 500 > 1000
        assert await gate.reserve(first, None)
        waiter = asyncio.ensure_future(gate.reserve(second, None))
        await asyncio.sleep(5)
        assert not waiter.done()
        gate.settle(first, {"usage": {"prompt_tokens": 100, "completion_tokens": 100,
                                      "total_tokens": 200}}, "ep")  # 700 back
        await asyncio.sleep(0.01)
        assert waiter.done() and waiter.result()
        assert clock() - _minute_start() < 7  # long before the window reset
    run(main)


def test_reject_and_never_fits_raise_budget_exceeded() -> None:
    async def main(clock: VirtualClock) -> None:
        gate, _ = _gate(clock, policy="reject")
        assert await gate.reserve(_hold(gate, 793), None)
        with pytest.raises(BudgetExceeded) as refused:
            await gate.reserve(_hold(gate, 393), None)
        assert refused.value.dlq_type == "budget" and refused.value.retryable
        waiting, _ = _gate(clock, policy="wait")
        with pytest.raises(BudgetExceeded) as never:
            await waiting.reserve(_hold(waiting, 1000), None)  # 1107 > the whole minute
        assert not never.value.retryable and "could never run" in str(never.value)
    run(main)


def test_a_deadline_ends_the_wait_and_the_line_moves_on() -> None:
    async def main(clock: VirtualClock) -> None:
        await asyncio.sleep(_minute_start() - clock() + 1)
        gate, _ = _gate(clock)
        assert await gate.reserve(_hold(gate, 793), None)
        late, patient = _hold(gate, 393, priority=0), _hold(gate, 393, priority=5)
        deadline = int((clock() + 3) * 1000)
        results: dict[str, Any] = {}

        async def wait(name: str, hold: Hold, dl: int | None) -> None:
            results[name] = (await gate.reserve(hold, dl), clock() - _minute_start())
        await asyncio.gather(wait("late", late, deadline), wait("patient", patient, None))
        assert results["late"][0] is False and results["late"][1] == pytest.approx(4.0)
        assert results["patient"][0] is True and 60 <= results["patient"][1] < 61
        assert gate._lines == {}
    run(main)

"""Budget windows and reservations on a hand-moved clock (the local counters; the Lua script
runs against a real Redis in tests/integration/test_budgets.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from streams.config import load_settings
from streams.dispatch.budgets import GUARD_SECONDS, Budgets, Refusal, Reservation, window_span
from tests.fakes.clock import Clock

T0 = datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC).timestamp()  # a minute, hour, day, month ends


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_windows_are_calendar_aligned_in_utc() -> None:
    t = _ts(2026, 2, 14, 10, 30, 15)
    assert window_span("minute", t) == (_ts(2026, 2, 14, 10, 30), _ts(2026, 2, 14, 10, 31))
    assert window_span("hour", t) == (_ts(2026, 2, 14, 10), _ts(2026, 2, 14, 11))
    assert window_span("day", t) == (_ts(2026, 2, 14), _ts(2026, 2, 15))
    assert window_span("month", t) == (_ts(2026, 2, 1), _ts(2026, 3, 1))
    assert window_span("month", _ts(2026, 12, 31, 23, 59, 59)) == (_ts(2026, 12, 1), _ts(2027, 1, 1))
    start, end = window_span("minute", _ts(2026, 2, 14, 10, 31))  # a boundary opens a window
    assert start == _ts(2026, 2, 14, 10, 31) and end - start == 60


def _budgets(clock: Clock, **tenant: Any) -> Budgets:
    settings = load_settings(environ={}, tenants={"a": tenant},
                             limits={"local_fallback_fraction": 1.0})
    return Budgets(settings, None, clock=clock)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reserve_until_the_window_is_spent_then_it_resets_on_time() -> None:
    clock = Clock(T0 - 50)  # 10 s into a minute
    b = _budgets(clock, budgets=[{"window": "minute", "tokens": 1000}])
    got = [_run(b.try_reserve("a", 300, 0.0)) for _ in range(4)]
    assert [isinstance(g, Reservation) for g in got] == [True, True, True, False]
    refusal = got[3]
    assert isinstance(refusal, Refusal) and not refusal.never
    assert refusal.wait == pytest.approx(50.0)  # until the minute ends
    assert "900 tokens" in refusal.reason
    clock.now = T0  # the next minute: a fresh window
    assert isinstance(_run(b.try_reserve("a", 1000, 0.0)), Reservation)


def test_refund_and_extra_charge_after_the_call() -> None:
    async def main() -> None:
        clock = Clock(T0 - 50)
        b = _budgets(clock, budgets=[{"window": "minute", "tokens": 1000}])
        first = await b.try_reserve("a", 800, 0.0)
        assert isinstance(first, Reservation)
        assert isinstance(await b.try_reserve("a", 300, 0.0), Refusal)
        refunds: list[str] = []
        b.on_refund = refunds.append
        b.settle(first, 500, 0.0)  # used less than estimated: 300 back
        b.settle(first, 0, 0.0)  # once only
        assert refunds == ["a"]
        second = await b.try_reserve("a", 500, 0.0)
        assert isinstance(second, Reservation)
        assert isinstance(await b.try_reserve("a", 1, 0.0), Refusal)
        b.settle(second, 400, 0.0)  # 100 back
        third = await b.try_reserve("a", 100, 0.0)
        assert isinstance(third, Reservation)
        b.settle(third, 0, 0.0)  # a failed call gives it all back
        assert isinstance(await b.try_reserve("a", 100, 0.0), Reservation)
    _run(main())


def test_cost_budget_and_several_windows_all_or_nothing() -> None:
    clock = Clock(T0 - 50)
    b = _budgets(clock, budgets=[{"window": "minute", "tokens": 10_000},
                                 {"window": "day", "cost": 0.001}])
    assert isinstance(_run(b.try_reserve("a", 10, 0.0006)), Reservation)
    refused = _run(b.try_reserve("a", 10, 0.0006))
    assert isinstance(refused, Refusal) and "day budget" in refused.reason
    assert refused.wait == pytest.approx(110.0)  # until the day (and year) ends
    # the refused request charged nothing anywhere: the minute still has 9,990 tokens
    assert isinstance(_run(b.try_reserve("a", 9990, 0.0)), Reservation)


def test_a_request_larger_than_a_whole_window_never_fits() -> None:
    b = _budgets(Clock(T0 - 50), budgets=[{"window": "hour", "tokens": 100}])
    got = _run(b.try_reserve("a", 101, 0.0))
    assert isinstance(got, Refusal) and got.never


def test_near_a_boundary_both_windows_are_charged_and_validity_follows_the_call() -> None:
    async def main() -> None:
        clock = Clock(T0 - GUARD_SECONDS / 2)
        b = _budgets(clock, budgets=[{"window": "minute", "tokens": 1000}])
        res = await b.try_reserve("a", 600, 0.0)
        assert isinstance(res, Reservation)
        assert sorted(c.start for c in res.charges) == [T0 - 60, T0]
        clock.now = T0 + 1  # the call landed in the next minute: still covered
        assert b.valid_at(res, clock.now)
        assert isinstance(await b.try_reserve("a", 600, 0.0), Refusal)  # 600 of it held there
        clock.now = T0 + 60 - GUARD_SECONDS / 4  # a retry near the end of the next one: not
        assert not b.valid_at(res, clock.now)
    _run(main())


def test_tenants_not_named_get_their_own_copy_of_default_budgets() -> None:
    settings = load_settings(environ={}, tenants={
        "default": {"budgets": [{"window": "minute", "tokens": 100}]},
        "big": {"budgets": [{"window": "minute", "tokens": 10_000}]},
        "free": {}})
    b = Budgets(settings, None, clock=Clock(T0 - 50))
    assert isinstance(_run(b.try_reserve("x", 100, 0.0)), Reservation)
    assert isinstance(_run(b.try_reserve("y", 100, 0.0)), Reservation)  # not x's window
    assert isinstance(_run(b.try_reserve("x", 1, 0.0)), Refusal)
    assert isinstance(_run(b.try_reserve("big", 5000, 0.0)), Reservation)
    assert b.budgets("free") == []
    keys = {c.key for c in b.charges("x", 1, 0.0, T0 - 50)}
    assert all("{t:" in k for k in keys)  # one Redis Cluster hash tag per tenant


def test_local_fallback_keeps_a_share_of_each_budget() -> None:
    settings = load_settings(environ={}, tenants={"a": {"budgets": [
        {"window": "minute", "tokens": 1000}]}}, limits={"local_fallback_fraction": 0.25})
    b = Budgets(settings, None, clock=Clock(T0 - 50))
    assert isinstance(_run(b.try_reserve("a", 250, 0.0)), Reservation)
    assert isinstance(_run(b.try_reserve("a", 1, 0.0)), Refusal)

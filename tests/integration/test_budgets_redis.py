"""Budgets on the real Redis: reservations shared by independent workers are atomic, the
correction after the call refunds or charges, keys carry the tenant's hash tag and expire,
and an unreachable Redis falls back to local windows at the configured fraction."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from streams.config import Settings
from streams.dispatch.budgets import Budgets, Refusal, Reservation

pytestmark = pytest.mark.integration


def _settings(**limits: Any) -> Settings:
    return Settings(redis={"key_prefix": "test-budget"}, limits=limits, tenants={
        "t": {"budgets": [{"window": "minute", "tokens": 5_000}, {"window": "day", "cost": 1.0}]}})


async def _away_from_a_minute_boundary() -> None:
    if time.time() % 60 > 55:
        await asyncio.sleep(60 - time.time() % 60 + 0.5)


async def test_concurrent_reservations_of_three_workers_never_overshoot(
    redis_clients: list[Any], redis_client: aioredis.Redis
) -> None:
    await _away_from_a_minute_boundary()
    workers = [Budgets(_settings(), c) for c in redis_clients]
    got = await asyncio.gather(*(workers[i % 3].try_reserve("t", 100, 0.0001)
                                 for i in range(200)))
    held = [g for g in got if isinstance(g, Reservation)]
    assert len(held) == 50 and all(isinstance(g, Refusal) for g in got if g not in held)
    assert all(g.shared for g in held)
    keys = sorted(k.decode() for k in await redis_client.keys("test-budget:b:*"))
    assert len(keys) == 2 and all("{t:" in k for k in keys), keys
    ttls = [await redis_client.pttl(k) for k in keys]
    assert all(t > 0 for t in ttls), ttls
    minute = next(k for k in keys if ":minute:" in k)
    assert int(await redis_client.get(minute)) == 5_000
    # the calls used 60 tokens each: 40 refunded per reservation, room for 20 more requests
    for i, res in enumerate(held):
        workers[i % 3].settle(res, 60, 0.00006)
    for w in workers:
        await w.aclose()
    assert int(await redis_client.get(minute)) == 3_000
    day = next(k for k in keys if ":day:" in k)
    assert int(await redis_client.get(day)) == 50 * 60_000  # 6e-5 in 1e-9 units each
    more = await asyncio.gather(*(workers[i % 3].try_reserve("t", 100, 0.0) for i in range(30)))
    assert sum(isinstance(g, Reservation) for g in more) == 20


async def test_unreachable_redis_falls_back_to_a_local_share(
    unreachable_redis: aioredis.Redis,
) -> None:
    budgets = Budgets(_settings(local_fallback_fraction=0.5), unreachable_redis)
    first = await budgets.try_reserve("t", 2_500, 0.0)
    assert isinstance(first, Reservation) and not first.shared
    assert isinstance(await budgets.try_reserve("t", 1, 0.0), Refusal)

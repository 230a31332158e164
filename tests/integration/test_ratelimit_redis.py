"""Rate limits on the real Redis: shared by independent limiters (one per simulated worker),
and the local fallback when Redis is unreachable."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.config import EndpointConfig, Settings
from streams.contract import Request
from streams.dispatch.parts import build_dispatcher
from streams.dispatch.ratelimit import RATE_HEADROOM, RESERVE_AHEAD_SECONDS, RateLimiter
from tests.fakes.windows import limit_run, max_in_measured_window

pytestmark = pytest.mark.integration


def _settings(**ep: Any) -> Settings:
    endpoint = EndpointConfig(name="ep", url="http://ep.test/v1", timeout_seconds=5, **ep)
    return Settings(endpoints=[endpoint], redis={"key_prefix": "test-rl"})



async def test_rpm_holds_across_three_limiters(redis_clients: list[Any]) -> None:
    settings = _settings(rpm=600)
    limiters = [RateLimiter(settings, c) for c in redis_clients]
    grants = await limit_run(limiters, settings.endpoints[0], 1.4)
    assert not any(lim.degraded for lim in limiters)
    assert max_in_measured_window(grants) <= 10  # 600 rpm = 10/s, smooth, never a burst
    assert len(grants) >= 14  # and yet the budget is used (~9.8/s for 1.4 s, + reserved)


async def test_reservations_in_the_script(redis_clients: list[Any]) -> None:
    """The Lua script's arithmetic: slots one interval apart, granted up to the horizon."""
    settings = _settings(rpm=600)
    endpoint = settings.endpoints[0]
    a, b = RateLimiter(settings, redis_clients[0]), RateLimiter(settings, redis_clients[1])
    interval = 0.1 / RATE_HEADROOM
    waits = []
    for i in range(5):
        decision = await (a if i % 2 else b).acquire(endpoint, 1)
        assert decision.permit is not None
        waits.append(decision.wait)
    assert waits == pytest.approx([i * interval for i in range(5)], abs=0.01)
    refused = await a.acquire(endpoint, 1)
    assert refused.permit is None and refused.limit == "rpm"
    assert refused.wait == pytest.approx(5 * interval - 2 * interval, abs=0.01)


async def test_concurrency_is_shared(redis_clients: list[Any]) -> None:
    settings = _settings(max_concurrency=2)
    endpoint = settings.endpoints[0]
    limiters = [RateLimiter(settings, c) for c in redis_clients]
    decisions = [await lim.acquire(endpoint, 1) for lim in limiters]
    granted = [(lim, d.permit) for lim, d in zip(limiters, decisions, strict=True) if d.permit]
    assert len(granted) == 2
    refused = decisions[2]
    assert refused.permit is None and refused.limit == "concurrency" and refused.wait > 0
    lim, permit = granted[0]
    lim.release(permit)
    await lim.aclose()
    assert (await limiters[2].acquire(endpoint, 1)).permit is not None


async def test_tpm_estimate_is_corrected_with_real_usage(redis_clients: list[Any]) -> None:
    settings = _settings(tpm=60_000)
    endpoint = settings.endpoints[0]
    a, b = RateLimiter(settings, redis_clients[0]), RateLimiter(settings, redis_clients[1])
    big = await a.acquire(endpoint, 2000)
    assert big.permit is not None and big.permit.shared
    refused = await b.acquire(endpoint, 10)
    assert refused.permit is None and refused.limit == "tpm"
    half = RESERVE_AHEAD_SECONDS / 2  # asked again when the slot is half the horizon away
    assert refused.wait == pytest.approx(2.0 / RATE_HEADROOM - half, abs=0.05)
    a.release(big.permit, used_tokens=100)
    await a.aclose()
    reserved = await b.acquire(endpoint, 10)  # now 0.1 s ahead: within the horizon
    assert reserved.permit is not None and reserved.wait == pytest.approx(0.1 / RATE_HEADROOM, abs=0.05)


async def test_unreachable_redis_falls_back_to_a_local_limiter(
    unreachable_redis: aioredis.Redis,
) -> None:
    settings = _settings(rpm=60)
    endpoint = settings.endpoints[0]
    limiter = RateLimiter(settings, unreachable_redis)
    first = await limiter.acquire(endpoint, 1)
    assert first.permit is not None and not first.permit.shared and limiter.degraded
    second = await limiter.acquire(endpoint, 1)  # the local limiter still holds rpm
    assert second.permit is not None and not second.permit.shared
    assert second.wait == pytest.approx(1 / RATE_HEADROOM, abs=0.05)  # reserved a slot on
    limiter.release(first.permit)
    limiter.release(second.permit)
    await limiter.aclose()


class Switch:
    """Passes calls to a real client, or fails them like an unreachable server."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.down = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)

        async def call(*args: Any, **kw: Any) -> Any:
            if self.down:
                raise RedisConnectionError("Connection refused")
            return await attr(*args, **kw)

        return call


async def test_recovers_when_redis_returns(redis_clients: list[Any]) -> None:
    settings = _settings(rpm=600)
    endpoint = settings.endpoints[0]
    now = [100.0]
    switch = Switch(redis_clients[0])
    limiter = RateLimiter(settings, switch, clock=lambda: now[0])
    local = await limiter.acquire(endpoint, 1)
    assert local.permit is not None and not local.permit.shared and limiter.degraded
    switch.down = False
    now[0] += 1.0  # past the retry delay
    shared = await limiter.acquire(endpoint, 1)
    assert shared.permit is not None and shared.permit.shared and not limiter.degraded
    # the grant is visible to another worker at once
    other = await RateLimiter(settings, redis_clients[1]).acquire(endpoint, 1)
    assert other.permit is not None and other.wait == pytest.approx(0.1 / RATE_HEADROOM, abs=0.02)


class RecordingUpstream:
    def __init__(self) -> None:
        self.times: list[float] = []

    async def complete(self, endpoint: Any, model: str, messages: Any, params: Any) -> Any:
        self.times.append(time.monotonic())
        await asyncio.sleep(0.01)
        return {"choices": [{"message": {"content": "ok"}}], "usage": {"total_tokens": 3}}


async def test_three_dispatchers_share_an_rpm_limit(redis_clients: list[Any]) -> None:
    settings = _settings(rpm=1200)  # 20/s across the group
    upstream = RecordingUpstream()
    dispatchers = [build_dispatcher(settings, upstream, c, CollectorRegistry()) for c in redis_clients]
    for d in dispatchers:
        await d.start()
    try:
        reqs = [Request(id=f"r{i}", input="hi", model="m") for i in range(30)]
        done = await asyncio.gather(
            *(dispatchers[i % 3].dispatch(r) for i, r in enumerate(reqs))
        )
    finally:
        for d in dispatchers:
            await d.stop()
    assert len(done) == 30 and all(c.endpoint == "ep" for c in done)
    assert max_in_measured_window(sorted(upstream.times)) <= 20
